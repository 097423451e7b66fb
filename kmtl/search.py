"""Model selection for multi-task models: static task weights, the branch point, a tuner space.

- `task_weights(build_fn, train, validation)`: trains one model per candidate
  weight vector (a simplex grid or Dirichlet draws), scores each on held-out
  data (a validation set, or k folds of the training set) and picks the best
  by an objective over the tasks; returns a `WeightSearch`.
- `branch_point(build_fn, train, validation)`: the same for the number of
  hard-shared trunk blocks (`shared_depth`); returns a `BranchSearch`.
- `hypermodel(build_fn, tasks)`: the same search space as a
  `keras_tuner.HyperModel` (per-task weights, `shared_depth`), for Keras
  Tuner's searches.

Both searches can resume: with `results_file`, every finished (candidate,
fold) is written to that JSON file at once, and a rerun trains only what is
missing.

**Objectives** (lower is better). Each candidate `c` has, for every compared
(task `t`, metric `m`) pair, its held-out score `M[c, t, m]` (mean over folds);
`metrics` chooses the pairs (default: every metric of each task but `loss`).
With a reference `B[t, m]` (see `baselines`), the normalised score of a pair is
the term of Δm (`kmtl.delta.delta_m`, in %, positive = worse than the
reference):

    g[c, t, m] = 100 * (-1)^δ (M[c, t, m] - B[t, m]) / |B[t, m]|,   δ = 1 if higher is better

- `"delta_m"`: `mean_{t, m} g[c, t, m]`, Δm of the candidate against `B`.
- `{task: w}`: `sum_t w_t * mean_{m of t} g[c, t, m] / sum_t w_t`, the weighted
  mean of the tasks' normalised scores (weights >= 0, not all 0).
- `"mean_rank"`: the candidate's rank among the candidates on each pair
  (1 = best, ties share their mean rank), averaged over the pairs.

The reference `B` (`baselines`): None (default) takes the best value any
candidate reached on each pair, as `kmtl.baselines.static_weight_sweep`
does (Δm then measures the relative gap to the best of the search); a mapping
`{task: {metric: value}}` gives single-task results (e.g.
`kmtl.baselines.single_task_baselines(config).mean`); `"train"` (weight
search only) trains, on the same folds and budget, the model with loss weight
1 on one task and 0 on the others, for each task, and takes its score on that
task. Ties go to the earlier candidate.

Example:

>>> import kmtl
>>> x, y = kmtl.data.synthetic_tasks(2, correlation=0.5, num_examples=512, input_dim=8)
>>> build = lambda: kmtl.build_model(kmtl.data.synthetic_heads(2), kmtl.trunks.dense((16,)), input_shape=(8,))
>>> search = kmtl.search.task_weights(build, (x, y), folds=2, budget=3, epochs=2)  # doctest: +SKIP
>>> search.best  # doctest: +SKIP
{'task_0': 1.0, 'task_1': 1.0}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import keras
import numpy as np

from kmtl import baselines as baselines_module
from kmtl import delta, experiment
from kmtl._fresh import fresh
from kmtl.errors import NonFiniteLossError
from kmtl.evaluation import evaluate

__all__ = ["BranchSearch", "WeightSearch", "branch_point", "hypermodel", "task_weights"]

#: The candidate strategies of `task_weights`.
STRATEGIES = ("grid", "random")
#: The named objectives (a `{task: weight}` mapping is the third form).
OBJECTIVES = ("delta_m", "mean_rank")
#: Epochs and batch size of every candidate when neither the call nor a config sets them.
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 128
#: The version of the results file.
RESULTS_FORMAT = 1
_SPACES = ("weights", "shared_depth")


# --------------------------------------------------------------------- arguments


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_data(value, name: str) -> tuple:
    """`(x, {task: y}[, {task: sample_weight}])` with as many examples everywhere."""
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3) or not isinstance(value[1], Mapping):
        raise ValueError(
            f"`{name}` must be a tuple `(x, {{task: y}})` (optionally `(x, {{task: y}}, {{task: weight}})`) "
            f"of NumPy arrays. Received: {name} of type {type(value).__name__}"
        )
    x = (
        {k: np.asarray(v) for k, v in value[0].items()}
        if isinstance(value[0], Mapping)
        else np.asarray(value[0])
    )
    parts = (x, {str(t): np.asarray(v) for t, v in value[1].items()})
    if len(value) == 3 and value[2] is not None:
        parts += ({str(t): np.asarray(v) for t, v in value[2].items()},)
    sizes = {len(a) for a in _leaves(parts)}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"Every array of `{name}` must hold the same non-zero number of examples. Received: lengths {sorted(sizes)}"
        )
    return parts


def _leaves(tree) -> list:
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, tuple):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def _take(tree, index):
    if isinstance(tree, Mapping):
        return {k: _take(v, index) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_take(v, index) for v in tree)
    return tree[index]


def _fingerprint(parts) -> str | None:
    if parts is None:
        return None
    digest = hashlib.sha256()
    for leaf in _leaves(parts):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _check_objective(objective, tasks: list[str]):
    if isinstance(objective, str) and objective in OBJECTIVES:
        return objective
    if isinstance(objective, Mapping):
        if sorted(objective) != sorted(tasks):
            raise ValueError(
                f"A `{{task: weight}}` objective must name exactly the tasks {tasks}. Received: objective={dict(objective)!r}"
            )
        weights = {}
        for task in tasks:
            weight = objective[task]
            if (
                isinstance(weight, bool)
                or not isinstance(weight, numbers.Real)
                or not math.isfinite(weight)
                or weight < 0
            ):
                raise ValueError(
                    f"Objective weights must be finite numbers >= 0. Received: objective[{task!r}]={weight!r}"
                )
            weights[task] = float(weight)
        if not any(weights.values()):
            raise ValueError(f"Objective weights must not all be 0. Received: objective={dict(objective)!r}")
        return weights
    raise ValueError(
        f"`objective` must be one of {list(OBJECTIVES)} or a mapping {{task: weight}} over the tasks {tasks}. "
        f"Received: objective={objective!r}"
    )


def _check_baselines(value, tasks: list[str], trainable: bool):
    allowed = "None, a mapping {task: {metric: value}}" + (' or "train"' if trainable else "")
    if value is None or (trainable and value == "train"):
        return value
    if isinstance(value, Mapping) and all(isinstance(value.get(t), Mapping) for t in tasks):
        return {t: {m: float(v) for m, v in value[t].items()} for t in tasks}
    raise ValueError(
        f"`baselines` must be {allowed} naming every task {tasks}. Received: baselines={value!r}"
    )


def _compile_options(options) -> dict:
    options = dict(options or {})
    for key in ("loss_weights",):
        if key in options:
            raise ValueError(
                f"`compile_options` must not set `{key}`: the search sets it. Received: compile_options keys {sorted(options)}"
            )
    options.setdefault("optimizer", "adam")
    return options


def _describe(value) -> str:
    """Stable JSON text of compile options (Keras objects by their serialized config)."""
    return json.dumps(value, sort_keys=True, default=keras.saving.serialize_keras_object)


# --------------------------------------------------------------------- held-out splits


def _splits(train, validation, folds, seed: int):
    """`[(train part, held-out part)]` and the held-out indices of each fold (None without folds)."""
    if folds is not None:
        folds = _count(folds, "folds", 2)
        if validation is not None:
            raise ValueError(
                "Give `folds` (cross-validation on `train`) or `validation`, not both. "
                f"Received: folds={folds} and validation data"
            )
        from sklearn.model_selection import KFold

        size = len(_leaves(train)[0])
        if folds > size:
            raise ValueError(
                f"`folds` must be at most the number of examples ({size}). Received: folds={folds}"
            )
        held = [index for _, index in KFold(folds, shuffle=True, random_state=seed).split(np.arange(size))]
        splits = [(_take(train, np.setdiff1d(np.arange(size), index)), _take(train, index)) for index in held]
        return splits, held
    if validation is None:
        raise ValueError(
            "Candidates are scored on held-out data: give `validation` data or `folds` (k >= 2) to "
            "cross-validate on `train`. Received: validation=None, folds=None"
        )
    return [(train, validation)], None


# --------------------------------------------------------------------- objectives


def _pairs(row: dict, tasks: list[str], metrics) -> list[tuple[str, str]]:
    if metrics is None:
        pairs = []
        for task in tasks:
            names = [m for m in row[task] if m != "loss"] or ["loss"]
            pairs += [(task, m) for m in names]
        return pairs
    if not isinstance(metrics, Mapping) or sorted(metrics) != sorted(tasks):
        raise ValueError(
            f"`metrics` must map every task {tasks} to metric names. Received: metrics={metrics!r}"
        )
    pairs = []
    for task in tasks:
        names = [metrics[task]] if isinstance(metrics[task], str) else list(metrics[task])
        missing = [m for m in names if m not in row[task]]
        if not names or missing:
            raise ValueError(
                f"`metrics[{task!r}]` must list metrics the task reports ({sorted(row[task])}). "
                f"Received: {metrics[task]!r}"
            )
        pairs += [(task, m) for m in names]
    return pairs


def _directions(pairs) -> dict:
    return delta.directions(
        pairs,
        remedy=f"choose the compared metrics with `metrics` (names in {delta.HIGHER_IS_BETTER} or "
        f"{delta.LOWER_IS_BETTER})",
    )


def _objective_values(scores: list, pairs, objective, reference) -> list[float]:
    """The objective of each candidate (`scores[c]`: `{task: {metric: mean}}` or None: failed, inf)."""
    values = np.full(len(scores), np.inf)
    ok = [i for i, row in enumerate(scores) if row is not None]
    if not ok:
        return values.tolist()
    directions = _directions(pairs)
    table = np.asarray([[scores[i][t][m] for t, m in pairs] for i in ok], dtype=np.float64)
    signs = np.asarray([1.0 if directions[p] else -1.0 for p in pairs])
    if objective == "mean_rank":
        from scipy.stats import rankdata

        values[ok] = rankdata(-table * signs, method="average", axis=0).mean(axis=1)
        return values.tolist()
    if reference is None:
        best = (table * signs).max(axis=0) * signs
        reference = {}
        for (task, metric), value in zip(pairs, best):
            reference.setdefault(task, {})[metric] = float(value)
    compared = {}
    for task, metric in pairs:
        compared.setdefault(task, []).append(metric)
    for i in ok:
        terms = delta.delta_m(scores[i], reference, metrics=compared).terms
        if objective == "delta_m":
            values[i] = float(np.mean(list(terms.values())))
        else:
            per_task = {t: np.mean([terms[(t, m)] for m in names]) for t, names in compared.items()}
            total = sum(objective.values())
            values[i] = float(sum(objective[t] * per_task[t] for t in compared) / total)
    return values.tolist()


# --------------------------------------------------------------------- the results file


class _Store:
    """The (candidate, fold) results of a search, kept in a JSON file written atomically."""

    def __init__(self, path, kind: str, settings: dict, resume: bool):
        self.path = None if path is None else Path(path)
        self.kind, self.settings = kind, settings
        self.hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.units: dict = {}
        if self.path is None or not resume or not self.path.exists():
            return
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            units = {u["key"]: u for u in stored["units"]}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"Cannot read the results file {str(self.path)!r} ({error}); pass resume=False to start over. "
                f"Received: results_file={str(self.path)!r}"
            ) from None
        if (
            stored.get("format") != RESULTS_FORMAT
            or stored.get("kind") != kind
            or stored.get("settings_hash") != self.hash
        ):
            old = stored.get("settings") or {}
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"The results file {str(self.path)!r} was written by a {stored.get('kind')} search with other "
                f"settings (differing: {changed or ['format']}); pass resume=False to start over or use another "
                f"file. Received: settings hash {self.hash}, file's {stored.get('settings_hash')}"
            )
        self.units = units

    def add(self, unit: dict) -> None:
        self.units[unit["key"]] = unit
        if self.path is not None:
            experiment.write_json_atomic(
                self.path,
                {
                    "format": RESULTS_FORMAT,
                    "kind": self.kind,
                    "settings_hash": self.hash,
                    "settings": self.settings,
                    "units": list(self.units.values()),
                },
            )


def _key(candidate: dict, fold: int) -> str:
    return json.dumps(candidate, sort_keys=True) + f"|fold={fold}"


# --------------------------------------------------------------------- the engine


@dataclasses.dataclass
class _Plan:
    """What every candidate is trained and scored with."""

    what: str
    splits: list
    epochs: int
    batch_size: int
    seed: int
    callbacks: list
    verbose: int
    store: _Store


def _fit(model, data, plan: _Plan):
    x, y, *weights = data
    keras_verbose = 2 if plan.verbose >= 2 else 0
    model.fit(
        x,
        y,
        sample_weight=weights[0] if weights else None,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        callbacks=list(plan.callbacks),
        verbose=keras_verbose,
    )


def _score(model, data, batch_size: int) -> dict:
    x, y, *weights = data
    report = evaluate(model, x, y=y, sample_weight=weights[0] if weights else None, batch_size=batch_size)
    return {task: dict(report[task]) for task in report}


def _run(plan: _Plan, candidates: list[tuple[dict, str, Callable]]) -> list[list[dict]]:
    """Trains and scores every (candidate, fold) not in the store; returns each candidate's fold units."""
    todo = [
        (c, f)
        for c, _, _ in candidates
        for f in range(len(plan.splits))
        if _key(c, f) not in plan.store.units
    ]
    total = len(candidates) * len(plan.splits)
    progress = experiment.Progress(plan.what, len(todo))
    if plan.verbose and total > len(todo):
        print(
            f"kmtl: {plan.what}: {total - len(todo)} of {total} (candidate, fold) runs read from "
            f"{plan.store.path}",
            flush=True,
        )
    units = []
    for candidate, label, make in candidates:
        done = []
        for fold, (fit_data, held_data) in enumerate(plan.splits):
            key = _key(candidate, fold)
            if key not in plan.store.units:
                if plan.verbose:
                    where = f", fold {fold + 1}/{len(plan.splits)}" if len(plan.splits) > 1 else ""
                    progress.begin(label + where)
                keras.utils.set_random_seed(plan.seed)
                start = time.perf_counter()
                model = make()
                unit = {"key": key, "candidate": candidate, "fold": fold, "scores": None, "error": None}
                try:
                    _fit(model, fit_data, plan)
                    unit["scores"] = _score(model, held_data, plan.batch_size)
                except NonFiniteLossError as error:  # a diverging candidate loses; the search goes on
                    unit["error"] = str(error).splitlines()[0]
                unit["seconds"] = time.perf_counter() - start
                plan.store.add(unit)
                progress.end()
            done.append(plan.store.units[key])
        units.append(done)
    return units


def _summaries(units: list[list[dict]]) -> list[tuple]:
    """`(mean, std, error)` of each candidate over its folds (mean/std None if a fold failed)."""
    out = []
    for folds in units:
        errors = [u["error"] for u in folds if u["error"]]
        if errors:
            out.append((None, None, errors[0]))
            continue
        mean, std = experiment.summarize(dict(enumerate(u["scores"] for u in folds)))
        out.append((mean, std, None))
    return out


def _table(labels: list[dict], summaries, objective, metrics, reference, tasks) -> tuple[list[dict], list]:
    scores = [s[0] for s in summaries]
    first = next((s for s in scores if s is not None), None)
    if first is None:
        raise ValueError(
            f"Every candidate diverged (non-finite loss): nothing to choose. Received: first error {summaries[0][2]!r}"
        )
    pairs = _pairs(first, tasks, metrics)
    values = _objective_values(scores, pairs, objective, reference)
    rows = []
    for label, (mean, std, error), value in zip(labels, summaries, values):
        rows.append({**label, "scores": mean, "std": std, "objective": value, "error": error})
    return rows, pairs


# --------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class _Search:
    """What a search found (see `WeightSearch` and `BranchSearch`)."""

    table: list
    best_index: int
    tasks: list
    pairs: list
    objective: object
    fold_indices: list | None
    model: object = None

    _name = "candidate"

    @property
    def best_row(self) -> dict:
        return self.table[self.best_index]

    @property
    def pareto(self) -> list[dict]:
        """The rows no other row dominates on every compared (task, metric) pair."""
        rows = [r for r in self.table if r["scores"] is not None]
        points = [[r["scores"][t][m] for t, m in self.pairs] for r in rows]
        directions = _directions(self.pairs)
        return [rows[i] for i in baselines_module.pareto_front(points, [directions[p] for p in self.pairs])]

    def _label(self, row) -> str:
        raise NotImplementedError

    def to_markdown(self) -> str:
        """A Markdown table: each candidate's mean ± std over folds, its objective; `*` marks the best."""
        front = {id(r) for r in self.pareto}
        header = [self._name] + [f"{t} {m}" for t, m in self.pairs] + ["objective", ""]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for i, row in enumerate(self.table):
            if row["scores"] is None:
                cells = ["diverged"] * len(self.pairs)
            else:
                cells = [f"{row['scores'][t][m]:.4f} ± {row['std'][t][m]:.4f}" for t, m in self.pairs]
            marks = ("*" if i == self.best_index else "") + (" front" if id(row) in front else "")
            lines.append(
                "| " + " | ".join([self._label(row), *cells, f"{row['objective']:.3f}", marks.strip()]) + " |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _figure_path(fig, path):
    if path is not None:
        fig.savefig(os.fspath(path), bbox_inches="tight")
    return fig


@dataclasses.dataclass(frozen=True)
class WeightSearch(_Search):
    """The result of `task_weights`.

    Attributes:
        table: one row per candidate, in order: `{"weights": {task: w},
            "scores": {task: {metric: mean over folds}}, "std": {...}
            (population std over folds), "objective": float (lower is
            better; inf if it diverged), "error": None or the divergence
            message}`.
        best: the chosen `{task: weight}` (lowest objective).
        best_index: its row.
        pareto: the rows on the Pareto front of the compared pairs.
        pairs: the compared `(task, metric)` pairs.
        objective: the objective used.
        baselines: the reference `{task: {metric: value}}` of the objective
            (None: the best candidate on each pair).
        fold_indices: the held-out example indices of each fold (None
            without folds).
        model: the chosen weights retrained on all of `train` (None with
            `refit=False`).
    """

    baselines: dict | None = None
    _name = "weights"

    @property
    def best(self) -> dict:
        return dict(self.table[self.best_index]["weights"])

    def _label(self, row) -> str:
        return ", ".join(f"{t}={w:.3g}" for t, w in row["weights"].items())

    def plot(self, path=None, tasks=None, metrics=None, figsize=(5.5, 4.5)):
        """The two-task plane: every candidate's held-out scores, the Pareto front, the chosen one.

        Args:
            path: where to save the figure (None: not saved).
            tasks: the tasks of the x and y axes (default: the first two).
            metrics: `{task: metric}` of the axes (default: each task's first compared metric).
            figsize: figure size.

        Returns:
            The `matplotlib.figure.Figure`.
        """
        import matplotlib.pyplot as plt

        tasks = list(tasks or self.tasks[:2])
        if len(tasks) != 2 or any(t not in self.tasks for t in tasks):
            raise ValueError(f"The plane needs two of the tasks {self.tasks}. Received: tasks={tasks!r}")
        names = [(metrics or {}).get(t) or next(m for u, m in self.pairs if u == t) for t in tasks]
        rows = [r for r in self.table if r["scores"] is not None]
        points = np.asarray([[r["scores"][t][m] for t, m in zip(tasks, names)] for r in rows])
        fig, ax = plt.subplots(figsize=figsize)
        ax.scatter(points[:, 0], points[:, 1], s=20, color="0.55", zorder=2, label="candidates")
        for row, point in zip(rows, points):
            ax.annotate(
                self._label(row), point, fontsize=6, color="0.4", xytext=(3, 3), textcoords="offset points"
            )
        directions = _directions(list(zip(tasks, names)))
        front = baselines_module.pareto_front(points, [directions[p] for p in zip(tasks, names)])
        ordered = points[sorted(front, key=lambda i: points[i, 0])]
        ax.plot(ordered[:, 0], ordered[:, 1], "--", color="0.35", lw=1, zorder=2, label="Pareto front")
        best = rows.index(self.best_row)
        ax.scatter(*points[best], s=110, facecolors="none", edgecolors="C3", lw=1.5, zorder=3, label="chosen")
        ax.set_xlabel(f"{tasks[0]} {names[0]}")
        ax.set_ylabel(f"{tasks[1]} {names[1]}")
        ax.set_title("task-weight search (held-out scores)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _figure_path(fig, path)


@dataclasses.dataclass(frozen=True)
class BranchSearch(_Search):
    """The result of `branch_point`: as `WeightSearch`, rows keyed `"shared_depth"`.

    `best` is the chosen `shared_depth`; `model` the refit model at that depth.
    """

    baselines: dict | None = None
    _name = "shared_depth"

    @property
    def best(self) -> int:
        return self.table[self.best_index]["shared_depth"]

    def _label(self, row) -> str:
        return str(row["shared_depth"])

    def plot(self, path=None, figsize=None):
        """The objective and each compared score (mean ± std over folds) against `shared_depth`."""
        import matplotlib.pyplot as plt

        rows = [r for r in self.table if r["scores"] is not None]
        depths = [r["shared_depth"] for r in rows]
        panels = [("objective", None)] + list(self.pairs)
        fig, axes = plt.subplots(1, len(panels), figsize=figsize or (3.2 * len(panels), 3), squeeze=False)
        for ax, (task, metric) in zip(axes[0], panels):
            if metric is None:
                ax.plot(depths, [r["objective"] for r in rows], "o-", color="0.3")
                ax.set_ylabel("objective (lower is better)")
            else:
                means = [r["scores"][task][metric] for r in rows]
                ax.errorbar(depths, means, yerr=[r["std"][task][metric] for r in rows], fmt="o-", capsize=2)
                ax.set_ylabel(f"{task} {metric}")
            ax.axvline(self.best, color="C3", ls=":", lw=1)
            ax.set_xlabel("shared_depth")
            ax.set_xticks(depths)
        fig.tight_layout()
        return _figure_path(fig, path)


# --------------------------------------------------------------------- the weight search


def _candidates(strategy, tasks: list[str], grid, budget, seed: int) -> list[dict]:
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}. Received: strategy={strategy!r}")
    if budget is not None:
        budget = _count(budget, "budget", 1)
    if strategy == "random":
        if grid is not None:
            raise ValueError(f"`grid` is for strategy='grid'. Received: grid={grid!r} with strategy='random'")
        return baselines_module.random_vectors(tasks, budget or baselines_module.RANDOM_CANDIDATES, seed)
    if grid is None:
        resolution = baselines_module.GRID_RESOLUTION
        if budget is not None:  # the finest lattice with at most `budget` points
            resolution = len(tasks)
            while math.comb(resolution, len(tasks) - 1) <= budget:
                resolution += 1
        vectors = baselines_module.simplex_grid(tasks, resolution)
    elif isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        vectors = baselines_module.simplex_grid(tasks, int(grid))
    else:
        vectors = baselines_module.check_weight_vectors(grid, tasks)
    if budget is not None and len(vectors) > budget:  # evenly spread over the list
        vectors = [vectors[int(i)] for i in np.round(np.linspace(0, len(vectors) - 1, budget))]
    return vectors


def _from_config(config, seed: int, epochs, batch_size):
    """The build function, training data, validation data, epochs and batch size of a config."""
    config = experiment.load_config(config)
    if config["weighting"] is not None:
        raise ValueError(
            "A task-weight search tunes static loss weights: remove the config's `weighting`. "
            f"Received: weighting={config['weighting']!r}"
        )
    options = dict(config, seed=seed)

    def arrays(split):
        from kmtl import data

        pipeline = data.task_dataset(
            config["dataset"],
            config["tasks"],
            split=split,
            batch_size=1024,
            shuffle=False,
            source=config["source"],
            data_dir=config["data_dir"],
        )
        batches = list(pipeline.as_numpy_iterator())
        return tuple(_concatenate([b[i] for b in batches]) for i in range(len(batches[0])))

    split = config["train_split"] or (
        "train" if not config["train_limit"] else f"train[:{int(config['train_limit'])}]"
    )
    train = arrays(split)
    validation = arrays(config["validation"]) if config["validation"] else None

    def make(vector):
        return experiment._build(dict(options, loss_weights=dict(vector)))

    return make, train, validation, epochs or config["epochs"], batch_size or config["batch_size"], config


def _concatenate(parts):
    if isinstance(parts[0], Mapping):
        return {k: _concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def task_weights(
    build_fn: Callable | Mapping | str | os.PathLike,
    train: tuple | None = None,
    validation: tuple | None = None,
    strategy: str = "grid",
    folds: int | None = None,
    budget: int | None = None,
    objective: str | Mapping = "delta_m",
    seed: int = 0,
    *,
    grid=None,
    metrics: Mapping | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    compile_options: Mapping | None = None,
    callbacks: Sequence | None = None,
    results_file: str | os.PathLike | None = None,
    resume: bool = True,
    refit: bool = True,
    baselines=None,
    verbose: int = 1,
) -> WeightSearch:
    """Searches static loss weights: trains each candidate, scores it held out, picks the best.

    Every candidate weight vector `w` is trained from the same initial
    weights (`keras.utils.set_random_seed(seed)` before each build) as
    `build_fn()` compiled with `loss_weights=w` and `compile_options`, for
    `epochs`, and scored by `kmtl.evaluate` on held-out data: on `validation`,
    or, with `folds=k`, on each of the k folds of `train`
    (`sklearn.model_selection.KFold(k, shuffle=True, random_state=seed)`)
    after training on the other k - 1, the scores averaged over the folds.
    The best candidate has the lowest objective (see the module docstring
    for the three objectives and the `baselines` reference); ties go to the
    earlier one. A candidate whose loss becomes non-finite
    (`kmtl.NonFiniteLossError`) gets objective inf and the search goes on.

    Args:
        build_fn: a function returning a fresh, uncompiled kmtl model (e.g.
            `lambda: kmtl.build_model(...)`); or a `kmtl.experiment` config
            (mapping or YAML/JSON path): its training split (`train_split`,
            `train_limit`) is loaded into arrays and becomes `train`, its
            `validation` split (if set, and unless `folds` is given)
            `validation`, each candidate is the config's model and optimizer
            (`kmtl train`'s) with the candidate as `loss_weights`, and
            `epochs`/`batch_size` default to the config's. The config may not
            set `weighting`; its `seeds` are not used (`seed` seeds the search).
        train: `(x, {task: y})` NumPy arrays (optionally a third element
            `{task: sample_weight}`); the task names are its keys.
        validation: held-out data of the same form, or None (then `folds`).
        strategy: `"grid"`: the simplex lattice `kmtl.baselines.simplex_grid`
            (every weight > 0, sum T), of resolution `grid` or the finest with
            at most `budget` points (default resolution 6), or the explicit
            vectors of `grid`; `"random"`: the uniform vector then
            Dirichlet(1) draws from `seed`, scaled to sum to T, `budget`
            of them (default 10).
        folds: None, or k >= 2 for k-fold cross-validation on `train`.
        budget: the most candidates (>= 1); a longer grid keeps `budget`
            vectors evenly spread over it.
        objective: `"delta_m"`, `"mean_rank"` or `{task: weight}`.
        seed: seeds the initial weights, the folds and the random candidates.
        grid: with `strategy="grid"`, a lattice resolution (int) or a list of
            vectors (`{task: weight}` or a list in task order).
        metrics: `{task: [metric names]}` compared by the objective and the
            Pareto front (default: each task's metrics but `loss`, or `loss`).
        epochs: epochs per candidate (default: the config's, else 10).
        batch_size: batch size (default: the config's, else 128).
        compile_options: other `MultiTaskModel.compile` arguments (default
            `{"optimizer": "adam"}`); an optimizer or strategy instance is
            copied for each candidate (from its config), so none shares state.
        callbacks: Keras callbacks passed to every `fit`.
        results_file: a JSON file holding every finished (candidate, fold),
            rewritten atomically after each: a rerun reads it and trains only
            the missing ones. Refused if written with other settings.
        resume: False ignores and overwrites an existing `results_file`.
        refit: retrain the best vector on all of `train` (`.model`).
        baselines: the reference of `"delta_m"` and `{task: weight}`: None
            (the best candidate per metric), `{task: {metric: value}}`, or
            `"train"` (single-task models trained on the same folds: loss
            weight 1 on the task, 0 on the others).
        verbose: 0 silent, 1 one line per (candidate, fold), 2 also Keras's
            per-epoch lines.

    Returns:
        A `WeightSearch`.

    Raises:
        ValueError: for `folds` < 2 or both `folds` and `validation`,
            neither of them, a `budget` < 1, weights or an objective that do
            not name the tasks, an unknown `strategy` or `objective`, bad
            data, metrics or baselines, or a `results_file` written with
            other settings.

    Example:

    >>> search = kmtl.search.task_weights(build, (x, y), folds=3, budget=5)  # doctest: +SKIP
    >>> print(search.to_markdown())  # doctest: +SKIP
    >>> search.plot("weights.png")  # doctest: +SKIP
    """
    config = None
    if callable(build_fn):
        if train is None:
            raise ValueError(
                "`train` data `(x, {task: y})` is required with a build function. Received: train=None"
            )
        train = _check_data(train, "train")
        validation = None if validation is None else _check_data(validation, "validation")
        epochs, batch_size = epochs or DEFAULT_EPOCHS, batch_size or DEFAULT_BATCH_SIZE
        options = _compile_options(compile_options)

        def make(vector):
            model = build_fn()
            model.compile(loss_weights=dict(vector), **{k: fresh(v) for k, v in options.items()})
            return model

        described = _describe(options)
    elif isinstance(build_fn, (Mapping, str, os.PathLike)):
        if train is not None or validation is not None or compile_options is not None:
            raise ValueError(
                "With a config, the data and the optimizer are the config's: leave `train`, `validation` and "
                "`compile_options` unset. Received: a config and explicit data or compile options"
            )
        make, train, validation, epochs, batch_size, config = _from_config(build_fn, seed, epochs, batch_size)
        if folds is not None:
            validation = None  # cross-validation on the training split replaces the config's validation split
        described = experiment.config_hash(config)
    else:
        raise ValueError(
            "`build_fn` must be a function returning an uncompiled kmtl model, or a kmtl.experiment config. "
            f"Received: {build_fn!r}"
        )
    tasks = list(train[1])
    vectors = _candidates(strategy, tasks, grid, budget, seed)
    objective = _check_objective(objective, tasks)
    baselines = _check_baselines(baselines, tasks, trainable=True)
    splits, fold_indices = _splits(train, validation, folds, seed)
    settings = {
        "tasks": tasks,
        "folds": folds,
        "seed": seed,
        "epochs": _count(epochs, "epochs", 1),
        "batch_size": _count(batch_size, "batch_size", 1),
        "model": described,
        "train": _fingerprint(train),
        "validation": _fingerprint(validation),
    }
    store = _Store(results_file, "task_weights", settings, resume)
    plan = _Plan("weight search", splits, epochs, batch_size, seed, list(callbacks or []), verbose, store)
    candidates = [
        ({"weights": v}, "weights " + ", ".join(f"{t}={w:.3g}" for t, w in v.items()), lambda v=v: make(v))
        for v in vectors
    ]
    if baselines == "train":
        for task in tasks:
            one_hot = {t: float(t == task) for t in tasks}
            candidates.append(({"single_task": task}, f"single-task {task}", lambda v=one_hot: make(v)))
    units = _run(plan, candidates)
    summaries = _summaries(units)
    if baselines == "train":
        singles, summaries = summaries[len(vectors) :], summaries[: len(vectors)]
        failed = [t for t, (mean, _, _) in zip(tasks, singles) if mean is None]
        if failed:
            raise ValueError(
                f"The single-task baseline(s) {failed} diverged: no reference for the objective."
            )
        baselines = {t: singles[i][0][t] for i, t in enumerate(tasks)}
    rows, pairs = _table([{"weights": v} for v in vectors], summaries, objective, metrics, baselines, tasks)
    best = int(np.argmin([r["objective"] for r in rows]))
    label = candidates[best][1]
    model = _refit(plan, train, lambda: make(vectors[best]), label) if refit else None
    return WeightSearch(
        table=rows,
        best_index=best,
        tasks=tasks,
        pairs=pairs,
        objective=objective,
        fold_indices=fold_indices,
        model=model,
        baselines=baselines,
    )


def _refit(plan: _Plan, train, make, label: str):
    if plan.verbose:
        examples = len(_leaves(train)[0])
        print(f"kmtl: {plan.what}: chose {label}; refit on all {examples} training examples", flush=True)
    keras.utils.set_random_seed(plan.seed)
    model = make()
    _fit(model, train, plan)
    return model


# --------------------------------------------------------------------- the branch point


def _model_spec(build_fn):
    """`(heads, trunk, input_shape, options)` of a tuple or mapping model spec, else None."""
    if isinstance(build_fn, Mapping):
        spec = dict(build_fn)
        return spec.pop("heads"), spec.pop("trunk"), spec.pop("input_shape"), spec
    if isinstance(build_fn, (tuple, list)) and len(build_fn) == 3:
        heads, trunk, input_shape = build_fn
        return heads, trunk, input_shape, {}
    return None


def _num_blocks(trunk) -> int:
    from kmtl import trunks

    return trunks.get(trunk).num_blocks


def _check_depths(depths, limit: int | None) -> list[int]:
    if depths is None:
        if limit is None:
            raise ValueError(
                "With a build function, give the `depths` to try (e.g. range(0, trunk.num_blocks + 1)). "
                "Received: depths=None"
            )
        depths = range(limit + 1)
    depths = list(depths)
    if not depths or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in depths):
        raise ValueError(f"`depths` must be a non-empty list of integers. Received: depths={depths!r}")
    if len(set(depths)) != len(depths):
        raise ValueError(f"`depths` lists a depth more than once. Received: depths={depths!r}")
    for depth in depths:
        if depth < 0 or (limit is not None and depth > limit):
            upper = "number of trunk blocks" if limit is None else limit
            raise ValueError(
                f"`shared_depth` must be in 0..{upper} (the trunk's blocks shared before the tasks branch). "
                f"Received: shared_depth={depth}"
            )
    return [int(d) for d in depths]


def _depth_builder(build_fn):
    """`(build(depth) -> uncompiled model, the largest depth or None)`."""
    spec = _model_spec(build_fn)
    if spec is None:
        if not callable(build_fn):
            raise ValueError(
                "`build_fn` must be a function of `shared_depth` returning an uncompiled kmtl model, or "
                f"`(heads, trunk, input_shape)`. Received: {build_fn!r}"
            )
        return build_fn, None
    heads, trunk, input_shape, options = spec

    def build(depth):
        import kmtl

        return kmtl.build_model(
            heads, trunk, input_shape, architecture="hard_sharing", shared_depth=depth, **options
        )

    return build, _num_blocks(trunk)


def _build_at(build, depth):
    try:
        return build(depth)
    except ValueError as error:
        raise ValueError(f"The model builder refused shared_depth={depth}: {error}") from error


def branch_point(
    build_fn: Callable | tuple | Mapping,
    train: tuple,
    validation: tuple | None = None,
    folds: int | None = None,
    depths: Sequence[int] | None = None,
    objective: str | Mapping = "delta_m",
    seed: int = 0,
    *,
    loss_weights: Mapping | None = None,
    metrics: Mapping | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    compile_options: Mapping | None = None,
    callbacks: Sequence | None = None,
    results_file: str | os.PathLike | None = None,
    resume: bool = True,
    refit: bool = True,
    baselines: Mapping | None = None,
    verbose: int = 1,
) -> BranchSearch:
    """Picks the number of shared trunk blocks of a hard-sharing model by held-out scores.

    For each `shared_depth` k in `depths`, the model whose first k trunk
    blocks are shared and whose other blocks are copied per task
    (`kmtl.build_model(..., architecture="hard_sharing", shared_depth=k)`;
    k = 0: independent networks, the single-task models trained side by side)
    is trained and scored exactly as the candidates of `task_weights` are
    (same seed for every depth, `validation` or `folds`, the same objectives;
    `baselines` is None or a mapping). Ties go to the earlier depth.

    Args:
        build_fn: a function `build_fn(shared_depth)` returning an uncompiled
            kmtl model; or `(heads, trunk, input_shape)` (or a mapping with
            those keys and other `kmtl.build_model` options).
        train, validation, folds, objective, seed, metrics, epochs,
        batch_size, compile_options, callbacks, results_file, resume,
        refit, verbose: as for `task_weights`.
        depths: the depths to try (default with a model spec: 0 ..
            `trunk.num_blocks`; required with a function).
        loss_weights: the static `{task: weight}` of every depth (default equal).
        baselines: None (the best depth on each metric) or `{task: {metric: value}}`.

    Returns:
        A `BranchSearch`; `best` is the chosen depth.

    Raises:
        ValueError: as `task_weights`; for a depth out of range (before
            training with a model spec; with a function, the builder's error,
            re-raised naming the depth).
    """
    train = _check_data(train, "train")
    validation = None if validation is None else _check_data(validation, "validation")
    tasks = list(train[1])
    build, limit = _depth_builder(build_fn)
    depths = _check_depths(depths, limit)
    objective = _check_objective(objective, tasks)
    baselines = _check_baselines(baselines, tasks, trainable=False)
    options = _compile_options(compile_options)
    weights = None if loss_weights is None else {str(t): float(w) for t, w in loss_weights.items()}
    splits, fold_indices = _splits(train, validation, folds, seed)
    epochs, batch_size = epochs or DEFAULT_EPOCHS, batch_size or DEFAULT_BATCH_SIZE

    def make(depth):
        model = _build_at(build, depth)
        model.compile(loss_weights=weights, **{k: fresh(v) for k, v in options.items()})
        return model

    settings = {
        "tasks": tasks,
        "folds": folds,
        "seed": seed,
        "epochs": _count(epochs, "epochs", 1),
        "batch_size": _count(batch_size, "batch_size", 1),
        "loss_weights": weights,
        "model": _describe([options, _model_spec(build_fn)]),
        "train": _fingerprint(train),
        "validation": _fingerprint(validation),
    }
    store = _Store(results_file, "branch_point", settings, resume)
    plan = _Plan(
        "branch-point search", splits, epochs, batch_size, seed, list(callbacks or []), verbose, store
    )
    candidates = [({"shared_depth": d}, f"shared_depth {d}", lambda d=d: make(d)) for d in depths]
    summaries = _summaries(_run(plan, candidates))
    rows, pairs = _table(
        [{"shared_depth": d} for d in depths], summaries, objective, metrics, baselines, tasks
    )
    best = int(np.argmin([r["objective"] for r in rows]))
    model = _refit(plan, train, lambda: make(depths[best]), candidates[best][1]) if refit else None
    return BranchSearch(
        table=rows,
        best_index=best,
        tasks=tasks,
        pairs=pairs,
        objective=objective,
        fold_indices=fold_indices,
        model=model,
        baselines=baselines,
    )


# --------------------------------------------------------------------- keras-tuner


def hypermodel(
    build_fn: Callable | tuple | Mapping,
    tasks: Sequence[str] | None = None,
    space: Sequence[str] = ("weights",),
    objective: str | Mapping = "loss",
    *,
    grid=None,
    depths: Sequence[int] | None = None,
    min_weight: float = 0.05,
    metrics: Mapping | None = None,
    baselines: Mapping | None = None,
    compile_options: Mapping | None = None,
):
    """The task-weight (and branch-point) search space as a `keras_tuner.HyperModel`.

    `build(hp)` draws the hyperparameters of `space` and returns the compiled model:

    - `"weights"`: `hp.Float("weight_<task>", min_weight, 1.0)` per task,
      normalised to sum to T (the scale is free, so only the ratios
      matter); with `grid` (a resolution or a list of vectors, as for
      `task_weights`), `hp.Choice("weights", ...)` over the vectors instead.
    - `"shared_depth"`: `hp.Int("shared_depth", 0, trunk.num_blocks)` with a
      model spec, else `hp.Choice("shared_depth", depths)` declared before
      `build_fn(hp)` runs, which reads it with `hp.get("shared_depth")`.

    `fit(hp, model, x, y, validation_data=...)` trains with `model.fit` and
    returns `{"score": ..., "<task>_<metric>": ...}` on `validation_data`.
    The score (lower is better) does not depend on the task weights: with
    `objective="loss"`, the mean over tasks of the ratio of each task's
    unweighted validation loss after training to its value before training
    (1 = learned nothing); with `{task: w}`, the `w`-weighted mean of those
    ratios, or, with `baselines`, of the tasks' normalised scores (module
    docstring); `"delta_m"` is Δm against `baselines` (required).
    `"mean_rank"` needs every candidate at once: use `task_weights`.

    Args:
        build_fn: `build_fn(hp)` returning an uncompiled kmtl model, or
            `(heads, trunk, input_shape)` (or a mapping with those keys and
            other `kmtl.build_model` options).
        tasks: the task names (default: the heads' names, or the built model's).
        space: a non-empty subset of `("weights", "shared_depth")`.
        objective: `"loss"`, `"delta_m"` or `{task: weight}`.
        grid: see `"weights"` above.
        depths: the depths of `"shared_depth"` with a build function.
        min_weight: the smallest drawn weight before normalisation, in (0, 1).
        metrics: the compared `{task: [metric names]}` (as for `task_weights`).
        baselines: `{task: {metric: value}}` for `"delta_m"` and `{task: w}`.
        compile_options: other `MultiTaskModel.compile` arguments (default
            `{"optimizer": "adam"}`, a fresh optimizer per trial).

    Returns:
        A `keras_tuner.HyperModel`; use it with `objective=keras_tuner.Objective("score", "min")`.

    Raises:
        ImportError: without keras-tuner (`pip install kmtl[tuner]`).
        ValueError: for an unknown `space` entry or objective, `"delta_m"`
            without `baselines`, or `"shared_depth"` without a trunk or `depths`.

    Example:

    >>> import keras_tuner  # doctest: +SKIP
    >>> tuner = keras_tuner.RandomSearch(kmtl.search.hypermodel((heads, trunk, (8,))),
    ...     objective=keras_tuner.Objective("score", "min"), max_trials=10, directory="tuning")  # doctest: +SKIP
    >>> tuner.search(x, y, epochs=5, validation_data=(x_val, y_val))  # doctest: +SKIP
    """
    try:
        import keras_tuner
    except ImportError as error:
        raise ImportError(
            "kmtl.search.hypermodel needs keras-tuner: `pip install kmtl[tuner]` (or `pip install keras-tuner`)."
        ) from error
    space = [space] if isinstance(space, str) else list(space)
    unknown = [s for s in space if s not in _SPACES]
    if not space or unknown:
        raise ValueError(f"`space` must be a non-empty subset of {list(_SPACES)}. Received: space={space!r}")
    spec = _model_spec(build_fn)
    if spec is None and not callable(build_fn):
        raise ValueError(
            f"`build_fn` must be a function of `hp` or `(heads, trunk, input_shape)`. Received: {build_fn!r}"
        )
    if tasks is None and spec is not None:
        tasks = [h.name for h in spec[0]]
    if "shared_depth" in space:
        limit = None if spec is None else _num_blocks(spec[1])
        depths = _check_depths(depths, limit)
    if objective == "mean_rank":
        raise ValueError(
            "`mean_rank` ranks every candidate at once; a tuner scores one trial at a time: use "
            "'loss', 'delta_m' or {task: weight}, or kmtl.search.task_weights. Received: objective='mean_rank'"
        )
    if not (objective in ("loss", "delta_m") or isinstance(objective, Mapping)):
        raise ValueError(
            f"`objective` must be 'loss', 'delta_m' or {{task: weight}}. Received: objective={objective!r}"
        )
    if isinstance(objective, Mapping) and tasks is not None:
        _check_objective(objective, list(tasks))
    if objective == "delta_m" and baselines is None:
        raise ValueError(
            "objective='delta_m' in a tuner needs `baselines` ({task: {metric: value}}): one trial has no "
            "other candidate to compare with. Received: baselines=None"
        )
    options = _compile_options(compile_options)
    if not 0 < float(min_weight) < 1:
        raise ValueError(f"`min_weight` must be in (0, 1). Received: min_weight={min_weight!r}")

    class TaskHyperModel(keras_tuner.HyperModel):
        """kmtl's task-weight search space (see `kmtl.search.hypermodel`)."""

        def build(self, hp):
            depth = None
            if "shared_depth" in space:
                if spec is not None and depths == list(range(depths[-1] + 1)):
                    depth = hp.Int("shared_depth", 0, depths[-1])
                else:
                    depth = hp.Choice("shared_depth", depths)
            if spec is None:
                model = build_fn(hp)
            else:
                import kmtl

                heads, trunk, input_shape, extra = spec
                if depth is not None:
                    extra = dict(extra, architecture="hard_sharing", shared_depth=depth)
                model = kmtl.build_model(heads, trunk, input_shape, **extra)
            names = list(tasks) if tasks is not None else list(model.task_names)
            weights = None
            if "weights" in space:
                weights = _draw_weights(hp, names, grid, float(min_weight))
            model.compile(loss_weights=weights, **{k: fresh(v) for k, v in options.items()})
            return model

        def fit(self, hp, model, x=None, y=None, validation_data=None, **kwargs):
            if validation_data is None:
                raise ValueError(
                    "The kmtl hypermodel scores each trial on `validation_data`: pass it to `tuner.search`. "
                    "Received: validation_data=None"
                )
            held = _check_data(tuple(validation_data), "validation_data")
            batch_size = kwargs.get("batch_size") or DEFAULT_BATCH_SIZE
            before = _score(model, held, batch_size)
            model.fit(x, y, **kwargs)
            after = _score(model, held, batch_size)
            names = list(after)
            goal = objective if objective == "loss" else _check_objective(objective, names)
            score = _trial_score(before, after, names, goal, metrics, baselines)
            flat = {f"{t}_{m}": float(v) for t, row in after.items() for m, v in row.items()}
            return {"score": score, **flat}

    return TaskHyperModel(name="kmtl_task_weights")


def _draw_weights(hp, tasks: list[str], grid, min_weight: float) -> dict:
    if grid is None:
        drawn = {t: hp.Float(f"weight_{t}", min_weight, 1.0) for t in tasks}
        total = sum(drawn.values())
        return {t: w * len(tasks) / total for t, w in drawn.items()}
    vectors = _candidates("grid", tasks, grid, None, 0)
    labels = {",".join(f"{v[t]:.4g}" for t in tasks): v for v in vectors}
    return dict(labels[hp.Choice("weights", list(labels))])


def _trial_score(before: dict, after: dict, tasks: list[str], objective, metrics, baselines) -> float:
    if objective == "loss" or (objective != "delta_m" and baselines is None):  # relative losses
        ratios = {t: after[t]["loss"] / before[t]["loss"] if before[t]["loss"] else math.inf for t in tasks}
        if objective == "loss":
            return float(np.mean(list(ratios.values())))
        return float(sum(objective[t] * ratios[t] for t in tasks) / sum(objective.values()))
    reference = _check_baselines(baselines, tasks, trainable=False)
    return float(_objective_values([after], _pairs(after, tasks, metrics), objective, reference)[0])
