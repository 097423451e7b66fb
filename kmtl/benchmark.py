"""`kmtl benchmark`: single-task, tuned static weights and the strategies on the MultiMNIST tables.

`run("multimnist")` trains, on one of the composite datasets
(`kmtl.data.COMPOSITE_DATASETS`: `multimnist`, `multifashion`,
`multi_fashion_mnist`, Sener & Koltun's recipe) with MultiLeNet
(`kmtl.trunks.lenet()`, hard sharing, Adam, batch 256):

1. the single-task baselines (`kmtl.evaluation.single_task_baselines`);
2. the tuned static scalarisation (`kmtl.evaluation.static_weight_sweep`,
   chosen on a validation split held out of the training images);
3. every strategy of `strategies` (default `STRATEGIES`: equal,
   uncertainty, GradNorm, MGDA-UB, PCGrad, CAGrad, Nash-MTL, FAMO, UPGrad),

each for every seed, and writes into `<out>/benchmark-<dataset>-<budget>/`:
`table.md` (left and right test accuracy, mean ± std over seeds; Δm and Δp
against kmtl's own single-task baselines; seconds per epoch; Sener & Koltun's
published numbers beside the rows they reported), `results.json` and
`tradeoff.png` (`kmtl.plots.plot_tradeoff`). Every run is a cached
`kmtl.experiment`: a repeated benchmark trains nothing, an interrupted one
trains only what is missing.

Budgets (`BUDGETS`): `full` is 10 epochs x 3 seeds on all 60,000 training
composites (a 5-point static grid); `quick` is 1 epoch x 1 seed (a 3-point
grid), which finishes within 15 minutes on a 2-core CPU. `epochs`, `seeds` and
`train_limit` override the budget.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

from kmtl import baselines, delta, experiment

__all__ = ["BUDGETS", "DATASETS", "REFERENCES", "STRATEGIES", "Benchmark", "run"]

DATASETS = ("multimnist", "multifashion", "multi_fashion_mnist")

#: The strategies of the table: name shown -> the config's `weighting`.
STRATEGIES = {
    "equal": "equal",
    "uncertainty": "uncertainty",
    "gradnorm": "gradnorm",
    # MGDA-UB: MGDA on the gradients of the shared representation, losses normalised
    # as Sener & Koltun did for MultiMNIST ("loss+").
    "mgda_ub": {"name": "mgda", "mode": "representation", "normalization": "loss+"},
    "pcgrad": "pcgrad",
    "cagrad": "cagrad",
    "nash_mtl": "nash_mtl",
    "famo": "famo",
    "upgrad": "upgrad",
}

#: Budgets: epochs, seeds, the static grid's resolution and the training examples (None: all).
BUDGETS = {
    "full": {"epochs": 10, "seeds": [0, 1, 2], "grid": 6, "train_limit": None},
    "quick": {"epochs": 1, "seeds": [0], "grid": 4, "train_limit": None},
}

#: The recipe every run shares.
RECIPE = {
    "trunk": "lenet",
    "architecture": "hard_sharing",
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "batch_size": 256,
}

#: Sener & Koltun (2018), Table 3, MultiMNIST with their LeNet: (left, right) accuracy in %.
#: Keys are this module's row names.
REFERENCES = {
    "multimnist": {
        "single-task": (97.23, 95.90),
        "equal": (96.46, 94.99),
        "uncertainty": (96.47, 95.29),
        "gradnorm": (96.27, 94.84),
        "mgda_ub": (97.26, 95.90),
    }
}
REFERENCE_SOURCE = 'Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization", Table 3'
_METRICS = {"left": ["accuracy"], "right": ["accuracy"]}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """What `run` measured and wrote.

    Attributes:
        dataset: the composite dataset.
        budget: `{"epochs", "seeds", "grid", "train_limit"}` used.
        rows: `[{"method", "left", "left_std", "right", "right_std", "delta_m",
            "delta_p", "seconds_per_epoch", "weights"?}]`, accuracies in %.
        directory: the directory holding `table.md`, `results.json`, `tradeoff.png`.
        table: the markdown of `table.md`.
        wall_seconds: the wall time of this call (0-ish when all was cached).
        training_seconds: the training time of every run and seed, cached
            or not (sum of epochs x seconds per epoch): what the budget costs.
    """

    dataset: str
    budget: dict
    rows: list
    directory: Path
    table: str
    wall_seconds: float
    training_seconds: float

    def __str__(self) -> str:
        return self.table


def budget_of(budgets: dict, quick: bool, epochs=None, seeds=None, train_limit=None) -> tuple[str, dict]:
    """`(name, budget)`: `budgets["quick" | "full"]` with the overrides given.

    An overridden budget is named `e<epochs>-s<number of seeds>[-n<train_limit>]`, so its runs
    are cached apart from the named budgets'.
    """
    name = "quick" if quick else "full"
    budget = dict(budgets[name])
    if epochs is not None:
        budget["epochs"] = epochs
    if seeds is not None:
        budget["seeds"] = list(seeds)
    if train_limit is not None:
        budget["train_limit"] = train_limit
    if budget != budgets[name]:
        name = f"e{budget['epochs']}-s{len(budget['seeds'])}" + (
            f"-n{budget['train_limit']}" if budget.get("train_limit") else ""
        )
    return name, budget


def training_seconds(results, epochs: int) -> float:
    """Training time of every seed of `results` (`kmtl.experiment.Result`s): epochs x s/epoch."""
    return sum(
        seconds * epochs
        for result in results
        for seconds in result.seconds_per_epoch.values()
        if seconds == seconds
    )


def choose(names, known: dict, what: str, default: dict | None = None) -> dict:
    """`{name: known[name]}` for the chosen `names` (None: `default`, else all of `known`).

    Raises:
        ValueError: for a string, an empty list or a name not in `known`.
    """
    if names is None:
        return dict(known if default is None else default)
    if isinstance(names, str) or not names:
        raise ValueError(
            f"`{what}` must be a non-empty list of names from {list(known)}. Received: {what}={names!r}"
        )
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"Unknown benchmark {what} {unknown}; the {what} are {list(known)}. Received: {what}={list(names)!r}"
        )
    return {name: known[name] for name in names}


def _check_strategies(strategies) -> dict:
    return choose(strategies, STRATEGIES, "strategies")


def _percent(row: dict, task: str) -> float:
    return 100.0 * float(row[task]["accuracy"])


def _row(method, mean, std, single, seconds, **extra) -> dict:
    change = delta.delta_m(mean, single.mean, metrics=_METRICS)
    return {
        "method": method,
        "left": _percent(mean, "left"),
        "left_std": _percent(std, "left"),
        "right": _percent(mean, "right"),
        "right_std": _percent(std, "right"),
        "delta_m": change.delta_m,
        "delta_p": change.delta_p,
        "seconds_per_epoch": seconds,
        **extra,
    }


def _table(dataset, budget_name, budget, rows, seeds_note) -> str:
    references = REFERENCES.get(dataset, {})
    header = "| method | left acc (%) | right acc (%) | Δm (%) ↓ | Δp (%) ↑ | s/epoch |"
    rule = "|---|---|---|---|---|---|"
    if references:
        header += " Sener & Koltun (left / right) |"
        rule += "---|"
    lines = [
        f"### {dataset}, budget {budget_name}: {budget['epochs']} epoch(s) x {len(budget['seeds'])} seed(s) "
        f"{budget['seeds']}"
        + (f", first {budget['train_limit']} training images" if budget["train_limit"] else ""),
        "",
        header,
        rule,
    ]
    for row in rows:
        name = row["method"]
        if "weights" in row:
            name += " (" + ", ".join(f"{t} {w:.3g}" for t, w in row["weights"].items()) + ")"
        cells = [
            name,
            f"{row['left']:.2f} ± {row['left_std']:.2f}",
            f"{row['right']:.2f} ± {row['right_std']:.2f}",
            f"{row['delta_m']:+.2f}",
            f"{row['delta_p']:+.2f}",
            f"{row['seconds_per_epoch']:.1f}" if math.isfinite(row["seconds_per_epoch"]) else "-",
        ]
        if references:
            reference = references.get(row["method"].split(" ")[0])
            cells.append(f"{reference[0]:.2f} / {reference[1]:.2f}" if reference else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", seeds_note]
    if references:
        lines.append(f"References: {REFERENCE_SOURCE} (their LeNet and budget, not re-run here).")
    return "\n".join(lines) + "\n"


def run(
    dataset: str = "multimnist",
    quick: bool = False,
    epochs: int | None = None,
    seeds=None,
    train_limit: int | None = None,
    strategies=None,
    out: str | os.PathLike = "saved_models",
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    force: bool = False,
    verbose: int | str = 0,
    resume: bool = True,
) -> Benchmark:
    """Runs the benchmark of one composite dataset and writes its table and plot.

    Args:
        dataset: `"multimnist"`, `"multifashion"` or `"multi_fashion_mnist"`.
        quick: the `quick` budget instead of `full` (see `BUDGETS`).
        epochs: override the budget's epochs.
        seeds: override the budget's seeds (distinct non-negative integers).
        train_limit: train on the first N training composites only.
        strategies: names from `STRATEGIES` (default: all).
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
        A `Benchmark`.

    Raises:
        ValueError: for an unknown dataset or strategy, or a bad budget value.
        FileNotFoundError: when MNIST / Fashion-MNIST cannot be found.
    """
    from kmtl import plots

    if dataset not in DATASETS:
        raise ValueError(
            f"Unknown benchmark dataset; expected one of {list(DATASETS)}. Received: {dataset!r}"
        )
    chosen = _check_strategies(strategies)
    budget_name, budget = budget_of(BUDGETS, quick, epochs, seeds, train_limit)
    start = time.perf_counter()
    prefix = f"bench-{dataset}-{budget_name}"
    config = dict(
        RECIPE,
        dataset=dataset,
        tasks=["left", "right"],
        epochs=budget["epochs"],
        seeds=budget["seeds"],
        train_limit=budget["train_limit"],
        out=os.fspath(out),
        data_dir=None if data_dir is None else os.fspath(data_dir),
        source=source,
        verbose=verbose,
        name=prefix,
    )
    config = experiment.load_config(config)
    print(
        f"kmtl: benchmark {dataset} ({budget_name}: {budget['epochs']} epoch(s), seeds {budget['seeds']}): "
        f"2 single-task runs, a static sweep, {len(chosen)} strategies -> {Path(out) / ('benchmark-' + dataset + '-' + budget_name)}",
        flush=True,
    )
    single = baselines.single_task_baselines(config, force=force, resume=resume)
    single_seconds = sum(single.seconds_per_epoch.values())
    sweep = baselines.static_weight_sweep(config, grid=budget["grid"], force=force, resume=resume)
    progress = experiment.Progress("benchmark strategy", len(chosen))
    results = {}
    for method, spec in chosen.items():
        progress.begin(method)
        results[method] = experiment.run(
            dict(config, weighting=spec, name=f"{prefix}-{method}"), force=force, resume=resume
        )
        progress.end()
    rows = [
        # Δm of the baselines against themselves is 0 by definition (+0, not the -0 of the formula).
        dict(_row("single-task", single.mean, single.std, single, single_seconds), delta_m=0.0, delta_p=0.0),
        _row(
            "static (tuned)",
            sweep.refit.mean,
            sweep.refit.std,
            single,
            sweep.refit.mean_seconds_per_epoch,
            weights=sweep.chosen_weights,
        ),
    ]
    for method, result in results.items():
        rows.append(_row(method, result.mean, result.std, single, result.mean_seconds_per_epoch))
    directory = Path(out) / f"benchmark-{dataset}-{budget_name}"
    directory.mkdir(parents=True, exist_ok=True)
    note = (
        "Mean ± std (ddof=0) over seeds of the test accuracy (10,000 test composites). Δm (positive = "
        "worse) and Δp (positive = better) against kmtl's own single-task baselines of the same budget "
        "(`kmtl.evaluation.delta_m`). The static row's weights were chosen on a validation split of "
        f"{sweep.splits['validation']} held out of the training images (candidates trained on "
        f"{sweep.splits['train']}), then retrained on all of them. "
        "s/epoch: mean wall-clock seconds of an epoch (validation included); the single-task row sums its "
        "two models."
    )
    table = _table(dataset, budget_name, budget, rows, note)
    (directory / "table.md").write_text(table, encoding="utf-8")
    drawn = {"static (tuned)": sweep.refit, **results}
    fig = plots.plot_tradeoff(
        {m: r.mean for m, r in drawn.items()},
        tasks=["left", "right"],
        spread={m: r.std for m, r in drawn.items()},
        single_task=single.mean,
        single_task_spread=single.std,
        sweep=sweep,
        references={
            f"S&K {name}": (left / 100, right / 100)
            for name, (left, right) in REFERENCES.get(dataset, {}).items()
        },
    )
    fig.axes[0].set_title(f"{dataset}: test accuracy ({budget_name})")
    fig.savefig(directory / "tradeoff.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    wall = time.perf_counter() - start
    runs = list(single.results.values()) + list(sweep.results) + [sweep.refit] + list(results.values())
    training = training_seconds(runs, budget["epochs"])
    record = {
        "dataset": dataset,
        "budget_name": budget_name,
        "budget": budget,
        "recipe": RECIPE,
        "rows": rows,
        "sweep": {
            "weights": sweep.weights,
            "validation": sweep.validation,
            "test": sweep.test,
            "scores": sweep.scores,
            "chosen": sweep.chosen,
            "splits": sweep.splits,
            "refit": {"mean": sweep.refit.mean, "std": sweep.refit.std},
        },
        "wall_seconds_this_call": wall,
        "training_seconds": training,
    }
    experiment.write_json_atomic(directory / "results.json", record)
    print(table)
    print(
        f"kmtl: wrote {directory}/ (table.md, results.json, tradeoff.png) in {wall:.0f} s; training all "
        f"{sum(len(r.per_seed) for r in runs)} runs took {training / 60:.1f} min (sum of epochs x s/epoch)"
    )
    return Benchmark(
        dataset=dataset,
        budget=budget,
        rows=rows,
        directory=directory,
        table=table,
        wall_seconds=wall,
        training_seconds=training,
    )
