"""`kmtl benchmark movielens`: the expert architectures and a few strategies on MovieLens 100K.

`run()` trains, on `kmtl.data.task_dataset("movielens", ...)` (the seeded
random 80/20 split of the 100,000 ratings, 4 sampled negatives per rating,
raw user and item features through `kmtl.data.movielens_features`, a dense
shared bottom `TRUNK`, Adam, batch 512):

1. the single-task baselines of `rating`, `liked` and `watched`
   (`kmtl.evaluation.single_task_baselines`: each task alone, same budget);
2. every architecture of `ARCHITECTURES` (hard sharing, MMoE, CGC, PLE on
   the tasks `rating`, `liked`, `watched`; ESMM on `rating`, `watched`,
   `liked_given_watched`, `watched_and_liked`) with every strategy of
   `strategies` (default `STRATEGIES`), every seed;

and writes `<out>/benchmark-movielens-<budget>/table.md` and
`results.json`. The table gives the test RMSE (and MAE) of `rating`, the AUC
of `liked` on the rated test pairs (ESMM: its conversion head
`liked_given_watched` on the same pairs), the AUC of `watched` on the rated
pairs and their sampled negatives, each mean ± std over seeds; Δm and Δp over
(rating RMSE, liked AUC, watched AUC) against the single-task rows; seconds
per epoch. Beside it, a classical reference: a tuned matrix factorisation
(`REFERENCE`) on ML-100K.

Every run is a cached `kmtl.experiment`: a repeated benchmark trains nothing,
an interrupted one trains what is missing. Budgets (`BUDGETS`): `full` 4
epochs x 3 seeds, `quick` 1 epoch x 1 seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

from kmtl import baselines, delta, experiment
from kmtl.benchmark import budget_of, choose, training_seconds

__all__ = ["ARCHITECTURES", "BUDGETS", "EXTRA_STRATEGIES", "REFERENCE", "STRATEGIES", "Benchmark", "run"]

#: The shared bottom of every model (the towers and experts of the expert
#: architectures are copies of it).
TRUNK = "dense:64,32"
#: architecture -> the tasks it trains.
ARCHITECTURES = {
    "hard_sharing": ["rating", "liked", "watched"],
    "mmoe": ["rating", "liked", "watched"],
    "cgc": ["rating", "liked", "watched"],
    "ple": ["rating", "liked", "watched"],
    "esmm": ["rating", "watched", "liked_given_watched", "watched_and_liked"],
}
#: The strategies: name shown -> the config's `weighting`.
STRATEGIES = {"equal": "equal", "uncertainty": "uncertainty", "pcgrad": "pcgrad"}
#: More strategies `strategies=` may name (not run by default).
EXTRA_STRATEGIES = {"famo": "famo", "upgrad": "upgrad", "nash_mtl": "nash_mtl", "gradnorm": "gradnorm"}
BUDGETS = {
    "full": {"epochs": 4, "seeds": [0, 1, 2]},
    "quick": {"epochs": 1, "seeds": [0]},
}
RECIPE = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 512}
#: The metrics of the table and of Δm: `{task: [metric]}`.
METRICS = {"rating": ["rmse"], "liked": ["auc"], "watched": ["auc"]}
#: The column `liked` of ESMM reads its conversion head.
_ESMM_LIKED = "liked_given_watched"
#: A tuned matrix factorisation on ML-100K (5-fold cross-validation, not re-run here).
REFERENCE = {
    "rmse": 0.934,
    "mae": 0.737,
    "source": "Surprise's benchmark table, SVD on MovieLens 100K, 5-fold cross-validation",
}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """What `run` measured and wrote (see `kmtl.benchmark.Benchmark`)."""

    budget: dict
    rows: list
    directory: Path
    table: str
    wall_seconds: float
    training_seconds: float

    def __str__(self) -> str:
        return self.table


def _columns(values: dict) -> dict:
    """`{task: {metric: v}}` of a run -> the table's `{task: {metric: v}}` (ESMM's liked is its pCVR)."""
    columns = {task: dict(values[task]) for task in ("rating", "watched") if task in values}
    columns["liked"] = dict(values["liked"] if "liked" in values else values[_ESMM_LIKED])
    return columns


def _row(method, mean, std, single, seconds) -> dict:
    mean, std = _columns(mean), _columns(std)
    change = delta.delta_m(mean, single.mean, metrics=METRICS)
    row = {
        "method": method,
        "delta_m": change.delta_m,
        "delta_p": change.delta_p,
        "seconds_per_epoch": seconds,
    }
    for task, metric in (("rating", "rmse"), ("rating", "mae"), ("liked", "auc"), ("watched", "auc")):
        row[f"{task}_{metric}"] = float(mean[task][metric])
        row[f"{task}_{metric}_std"] = float(std[task][metric])
    return row


def _table(budget_name, budget, rows, note) -> str:
    lines = [
        f"### movielens, budget {budget_name}: {budget['epochs']} epoch(s) x {len(budget['seeds'])} seed(s) "
        f"{budget['seeds']}",
        "",
        "| method | rating RMSE ↓ | rating MAE ↓ | liked AUC ↑ | watched AUC ↑ | Δm (%) ↓ | Δp (%) ↑ | s/epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = row["seconds_per_epoch"]
        cells = [row["method"]]
        for key in ("rating_rmse", "rating_mae", "liked_auc", "watched_auc"):
            cells.append(f"{row[key]:.4f} ± {row[key + '_std']:.4f}")
        cells += [
            f"{row['delta_m']:+.2f}",
            f"{row['delta_p']:+.2f}",
            f"{seconds:.1f}" if math.isfinite(seconds) else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"| matrix factorisation (reference) | {REFERENCE['rmse']:.3f} | {REFERENCE['mae']:.3f} | | | | | |"
    )
    lines += ["", note, f"Reference: {REFERENCE['source']} (another split protocol; not re-run here)."]
    return "\n".join(lines) + "\n"


def run(
    quick: bool = False,
    epochs: int | None = None,
    seeds=None,
    architectures=None,
    strategies=None,
    out: str | os.PathLike = "saved_models",
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    force: bool = False,
    verbose: int | str = 0,
    resume: bool = True,
) -> Benchmark:
    """Runs the MovieLens benchmark and writes its table.

    Args:
        quick: the `quick` budget instead of `full` (see `BUDGETS`).
        epochs: override the budget's epochs.
        seeds: override the budget's seeds.
        architectures: names from `ARCHITECTURES` (default: all).
        strategies: names from `STRATEGIES` or `EXTRA_STRATEGIES` (default:
            `STRATEGIES`).
        out: parent directory of every run and of the benchmark's directory.
        data_dir: the data root (default `$KMTL_DATA_DIR`).
        source: `"auto"`, `"local"` or `"tfds"`.
        force: retrain every run even if cached.
        verbose: Keras `fit` verbosity of each run.
        resume: continue a seed killed mid-training from its checkpoint
            (default); `False` (`kmtl benchmark --no-resume`) deletes such a
            checkpoint and trains that seed from the start. Finished runs
            are reused either way (unless `force`).

    Returns:
        A `Benchmark` (`rows`: one dict per method with `rating_rmse`,
        `rating_mae`, `liked_auc`, `watched_auc`, their `_std`, `delta_m`,
        `delta_p`, `seconds_per_epoch`).

    Raises:
        ValueError: for an unknown architecture or strategy, or a bad budget.
        FileNotFoundError: when MovieLens 100K cannot be found.
    """
    chosen_architectures = choose(architectures, ARCHITECTURES, "architectures")
    chosen_strategies = choose(
        strategies, {**STRATEGIES, **EXTRA_STRATEGIES}, "strategies", default=STRATEGIES
    )
    budget_name, budget = budget_of(BUDGETS, quick, epochs, seeds)
    start = time.perf_counter()
    prefix = f"bench-movielens-{budget_name}"
    config = experiment.load_config(
        dict(
            RECIPE,
            dataset="movielens",
            tasks=list(METRICS),
            trunk=TRUNK,
            epochs=budget["epochs"],
            seeds=budget["seeds"],
            out=os.fspath(out),
            data_dir=None if data_dir is None else os.fspath(data_dir),
            source=source,
            verbose=verbose,
            name=prefix,
        )
    )
    directory = Path(out) / f"benchmark-movielens-{budget_name}"
    combinations = [(a, s) for a in chosen_architectures for s in chosen_strategies]
    print(
        f"kmtl: benchmark movielens ({budget_name}: {budget['epochs']} epoch(s), seeds {budget['seeds']}): "
        f"3 single-task runs, {len(combinations)} architecture x strategy runs -> {directory}",
        flush=True,
    )
    single = baselines.single_task_baselines(config, force=force, resume=resume)
    progress = experiment.Progress("benchmark run", len(combinations))
    results = {}
    for architecture, strategy in combinations:
        method = f"{architecture} + {strategy}"
        progress.begin(method)
        results[method] = experiment.run(
            dict(
                config,
                architecture=architecture,
                tasks=ARCHITECTURES[architecture],
                weighting=chosen_strategies[strategy],
                name=f"{prefix}-{architecture}-{strategy}",
            ),
            force=force,
            resume=resume,
        )
        progress.end()
    single_row = _row("single-task", single.mean, single.std, single, sum(single.seconds_per_epoch.values()))
    rows = [dict(single_row, delta_m=0.0, delta_p=0.0)]
    rows += [_row(m, r.mean, r.std, single, r.mean_seconds_per_epoch) for m, r in results.items()]
    note = (
        "Mean ± std (ddof=0) over seeds on the test split (the seeded random 20 % of the ratings, split seed "
        "0 for every run; `watched` also on 4 sampled unrated items per rating). rating: RMSE and MAE on "
        "the rated pairs; liked (rating >= 4): AUC on the rated pairs (ESMM: its conversion head "
        "liked_given_watched); watched: AUC of rated vs sampled pairs. Δm (positive = worse) and Δp "
        "(positive = better) over rating RMSE, liked AUC and watched AUC against the single-task rows "
        "(`kmtl.evaluation.delta_m`). s/epoch: mean wall-clock seconds per epoch (test evaluation "
        "included); the single-task row sums its three models."
    )
    table = _table(budget_name, budget, rows, note)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "table.md").write_text(table, encoding="utf-8")
    wall = time.perf_counter() - start
    runs = list(single.results.values()) + list(results.values())
    training = training_seconds(runs, budget["epochs"])
    experiment.write_json_atomic(
        directory / "results.json",
        {
            "dataset": "movielens",
            "budget_name": budget_name,
            "budget": budget,
            "recipe": dict(RECIPE, trunk=TRUNK),
            "architectures": {a: ARCHITECTURES[a] for a in chosen_architectures},
            "rows": rows,
            "reference": REFERENCE,
            "wall_seconds_this_call": wall,
            "training_seconds": training,
        },
    )
    print(table)
    print(
        f"kmtl: wrote {directory}/ (table.md, results.json) in {wall:.0f} s; training all "
        f"{sum(len(r.per_seed) for r in runs)} runs took {training / 60:.1f} min (sum of epochs x s/epoch)"
    )
    return Benchmark(
        budget=budget,
        rows=rows,
        directory=directory,
        table=table,
        wall_seconds=wall,
        training_seconds=training,
    )
