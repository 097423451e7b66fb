"""Did sharing help? Single-task baselines and the tuned static-weight baseline.

Two baselines every multi-task comparison needs (Xin et al. 2022; Kurin et
al. 2022: a method that beats an untuned equal-weight sum may not beat a
tuned one):

- `single_task_baselines(config)`: the config's trunk trained on each task
  alone, with the same budget (epochs, batch size, optimizer, seeds).
- `static_weight_sweep(config, grid=...)`: fixed loss weights on a grid of
  the simplex (2-3 tasks) or drawn at random (more tasks), each trained for
  every seed, the best chosen on a validation split held out of the
  training data. The choice never reads the test split.

Both run through `kmtl.experiment.run`, so every candidate is cached by the
hash of its config: a repeated call trains nothing, an interrupted one
trains only what is missing, and `force=True` retrains. Both are also in
`kmtl.evaluation`.

Example:

>>> from kmtl import evaluation
>>> config = {"dataset": "digits", "epochs": 2, "seeds": [0, 1]}
>>> single = evaluation.single_task_baselines(config)  # doctest: +SKIP
>>> sweep = evaluation.static_weight_sweep(config, grid=4)  # doctest: +SKIP
>>> evaluation.delta_m(sweep.chosen_test, single.mean, metrics={"digit": ["accuracy"], "parity": ["accuracy"]})  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kmtl import delta, experiment

__all__ = [
    "Baselines",
    "Sweep",
    "check_weight_vectors",
    "pareto_front",
    "random_vectors",
    "simplex_grid",
    "single_task_baselines",
    "static_weight_sweep",
]

#: Default number of random weight vectors for more than three tasks.
RANDOM_CANDIDATES = 10
#: Default resolution of the simplex grid (`simplex_grid(tasks, 6)`: 5 points for 2 tasks).
GRID_RESOLUTION = 6
#: Default fraction of the training examples held out for validation.
VALIDATION_FRACTION = 0.1
_SELECTIONS = ("delta_m", "mean_rank")


def _base_name(config: dict) -> str:
    return config["name"] or f"{config['dataset']}-{experiment.config_hash(config)}"


# --------------------------------------------------------------------- single-task


@dataclasses.dataclass(frozen=True)
class Baselines:
    """The single-task baselines of a config.

    `mean`, `std` and `seconds_per_epoch` are read from `results`.

    Attributes:
        results: `{task: kmtl.experiment.Result}` of the model trained on that
            task alone.
        mean: `{task: {metric: mean over seeds}}` (test split): the
            `baselines` argument of `kmtl.evaluation.delta_m`.
        std: `{task: {metric: standard deviation over seeds}}` (`ddof=0`).
        seconds_per_epoch: `{task: mean seconds per epoch over seeds}`.
    """

    results: dict

    @property
    def mean(self) -> dict:
        return {task: dict(result.mean[task]) for task, result in self.results.items()}

    @property
    def std(self) -> dict:
        return {task: dict(result.std[task]) for task, result in self.results.items()}

    @property
    def seconds_per_epoch(self) -> dict:
        return {task: result.mean_seconds_per_epoch for task, result in self.results.items()}

    def __str__(self) -> str:
        lines = ["single-task baselines (mean ± std over seeds)"]
        for task, result in self.results.items():
            cells = ", ".join(
                f"{metric} {self.mean[task][metric]:.4f} ± {self.std[task][metric]:.4f}"
                for metric in self.mean[task]
            )
            lines.append(f"  {task}: {cells} ({len(result.per_seed)} seed(s), {result.run_dir})")
        return "\n".join(lines)


def single_task_baselines(
    config: str | os.PathLike | Mapping,
    force: bool = False,
    out: str | os.PathLike | None = None,
    verbose: int | str | None = None,
    resume: bool = True,
) -> Baselines:
    """Trains the config's trunk on each of its tasks alone, with the same budget.

    For each task, the config with `tasks=[task]`, no `weighting`, no
    `loss_weights` and `architecture="hard_sharing"` (one task needs no
    expert routing) is run by `kmtl.experiment.run` under the name
    `<name>-single-<task>` (`<name>`: the config's `name`, else
    `<dataset>-<hash>`), so every seed is cached like any experiment.
    Epochs, batch size, optimizer, learning rate, trunk, seeds and splits
    are the config's.

    Args:
        config: what `kmtl.experiment.load_config` accepts.
        force: retrain even if cached.
        out: parent directory of the runs (default: the config's `out`).
        verbose: Keras `fit` verbosity (default: the config's).
        resume: continue a seed killed mid-training from its checkpoint;
            `False` deletes such a checkpoint and trains that seed from the
            start (finished seeds stay cached; see `kmtl.experiment.run`).

    Returns:
        A `Baselines`; its `mean` is `{task: {metric: value}}` on the test
        split (or the config's `test_split`).

    Raises:
        ValueError: for a bad config (see `kmtl.experiment.load_config`).
    """
    config = experiment.load_config(config)
    base = _base_name(config)
    tasks = list(config["tasks"])
    progress = experiment.Progress("single-task", len(tasks))
    results = {}
    for task in tasks:
        progress.begin(task)
        single = dict(
            config,
            tasks=[task],
            weighting=None,
            loss_weights=None,
            architecture="hard_sharing",
            name=f"{base}-single-{task}",
        )
        results[task] = experiment.run(single, force=force, out=out, verbose=verbose, resume=resume)
        progress.end()
    return Baselines(results=results)


# --------------------------------------------------------------------- the weight grid


def simplex_grid(tasks: Sequence[str], resolution: int = GRID_RESOLUTION) -> list[dict]:
    """Weight vectors on the simplex lattice of step `1 / resolution`, every weight > 0.

    The weights of a vector sum to the number of tasks (mean 1), so the
    uniform point is the equal-weight sum `kmtl` trains by default. Vertices
    and edges (a task with weight 0) are left out: they do not train every
    task.

    Args:
        tasks: task names.
        resolution: lattice resolution n >= number of tasks.

    Returns:
        `[{task: weight}]`, C(n - 1, T - 1) vectors in lexicographic order
        (for 2 tasks and n = 6: left weight 1/3, 2/3, 1, 4/3, 5/3).

    Raises:
        ValueError: for fewer than two tasks or `resolution` < number of tasks.

    Example:

    >>> [w["a"] for w in simplex_grid(["a", "b"], 4)]
    [0.5, 1.0, 1.5]
    """
    tasks = _task_list(tasks)
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, (int, np.integer))
        or resolution < len(tasks)
    ):
        raise ValueError(
            f"`resolution` must be an integer >= the number of tasks ({len(tasks)}) so that every weight "
            f"is positive. Received: resolution={resolution!r}"
        )
    count = len(tasks)
    vectors = []
    for cuts in itertools.combinations(range(1, int(resolution)), count - 1):
        parts = np.diff((0,) + cuts + (int(resolution),))
        vectors.append({t: float(p) * count / resolution for t, p in zip(tasks, parts)})
    return vectors


def _task_list(tasks) -> list[str]:
    tasks = list(tasks)
    if len(tasks) < 2:
        raise ValueError(f"A weight sweep needs at least two tasks. Received: tasks={tasks!r}")
    return tasks


def random_vectors(tasks: list[str], count: int, seed: int) -> list[dict]:
    """The uniform vector, then `count - 1` Dirichlet(1) draws, each scaled to sum to T.

    Args:
        tasks: task names.
        count: number of vectors (>= 1).
        seed: seed of the draws (`numpy.random.default_rng`).

    Returns:
        `[{task: weight}]`, `count` vectors whose weights sum to `len(tasks)`.

    Example:

    >>> [round(sum(v.values()), 6) for v in random_vectors(["a", "b"], 3, seed=0)]
    [2.0, 2.0, 2.0]
    """
    rng = np.random.default_rng(seed)
    vectors = [{t: 1.0 for t in tasks}]
    for draw in rng.dirichlet(np.ones(len(tasks)), size=count - 1):
        vectors.append({t: float(w) * len(tasks) for t, w in zip(tasks, draw)})
    return vectors


def check_weight_vectors(grid, tasks: list[str]) -> list[dict]:
    """Checks a list of weight vectors and returns them as `{task: float}` in task order.

    Args:
        grid: a non-empty list of vectors, each a mapping `{task: weight}` naming
            exactly `tasks` or a list of `len(tasks)` weights in task order.
        tasks: task names.

    Returns:
        `[{task: weight}]`, the same vectors with float weights.

    Raises:
        ValueError: for an empty list, a vector that names other tasks or has
            another length, a negative or non-finite weight, an all-zero vector
            or a vector listed twice.
    """
    if isinstance(grid, Mapping) or isinstance(grid, str) or not isinstance(grid, Sequence) or not grid:
        raise ValueError(
            "`grid` must be a resolution (int), or a non-empty list of weight vectors, each a mapping "
            f"{{task: weight}} over the tasks {tasks} or a list of {len(tasks)} weights. Received: grid={grid!r}"
        )
    vectors = []
    for index, vector in enumerate(grid):
        if isinstance(vector, Mapping):
            if sorted(vector) != sorted(tasks):
                raise ValueError(
                    f"Weight vector {index} must name exactly the tasks {tasks}. Received: {dict(vector)!r}"
                )
            vector = {t: vector[t] for t in tasks}
        elif isinstance(vector, Sequence) and not isinstance(vector, str) and len(vector) == len(tasks):
            vector = dict(zip(tasks, vector))
        else:
            raise ValueError(
                f"Weight vector {index} must be a mapping over the tasks {tasks} or a list of "
                f"{len(tasks)} weights. Received: {vector!r}"
            )
        for task, weight in vector.items():
            ok = isinstance(weight, (int, float, np.integer, np.floating)) and not isinstance(weight, bool)
            if not ok or not math.isfinite(float(weight)) or float(weight) < 0:
                raise ValueError(
                    f"Weight vector {index}: the weight of {task!r} must be a finite number >= 0. "
                    f"Received: {weight!r}"
                )
        if not any(float(w) > 0 for w in vector.values()):
            raise ValueError(
                f"Weight vector {index} is all zero: nothing would be trained. Received: {vector!r}"
            )
        vectors.append({t: float(w) for t, w in vector.items()})
    keys = [tuple(v.values()) for v in vectors]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"`grid` lists weight vector(s) {repeated} more than once. Received: grid={grid!r}")
    return vectors


def _candidate_vectors(grid, tasks: list[str], seed: int) -> list[dict]:
    if grid is None:
        return simplex_grid(tasks) if len(tasks) <= 3 else random_vectors(tasks, RANDOM_CANDIDATES, seed)
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        if len(tasks) <= 3:
            return simplex_grid(tasks, int(grid))
        if grid < 1:
            raise ValueError(f"`grid` (a number of random candidates) must be >= 1. Received: grid={grid!r}")
        return random_vectors(tasks, int(grid), seed)
    return check_weight_vectors(grid, tasks)


# --------------------------------------------------------------------- splits


def _holdout_splits(config: dict, fraction: float) -> tuple[str, str]:
    """(train split, validation split): the last `fraction` of the training examples held out."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(
            "`validation` must be the fraction of the training examples held out, a number in (0, 1). "
            f"Received: validation={fraction!r}"
        )
    if config["train_split"] is not None:
        raise ValueError(
            "The sweep holds its validation split out of the training examples itself; leave "
            f"`train_split` unset (use `train_limit`). Received: train_split={config['train_split']!r}"
        )
    if config["train_limit"] is not None:
        total = int(config["train_limit"])
        held = int(round(total * fraction))
        if held < 1 or held >= total:
            raise ValueError(
                f"`validation={fraction}` of train_limit={total} examples leaves no validation or no "
                "training examples."
            )
        return f"train[:{total - held}]", f"train[{total - held}:{total}]"
    percent = fraction * 100
    if abs(percent - round(percent)) > 1e-9:
        raise ValueError(
            "Without `train_limit`, `validation` must be a whole percentage (0.1, 0.05, ...). "
            f"Received: validation={fraction!r}"
        )
    cut = 100 - int(round(percent))
    return f"train[:{cut}%]", f"train[{cut}%:]"


# --------------------------------------------------------------------- the sweep


def pareto_front(points: Sequence[Sequence[float]], higher_is_better: Sequence[bool]) -> list[int]:
    """Indices of the points no other point dominates (at least as good everywhere, better once).

    Args:
        points: `[[value per objective]]`.
        higher_is_better: the direction of each objective.

    Returns:
        The indices of the non-dominated points, in increasing order.

    Example:

    >>> pareto_front([[1, 1], [2, 0], [0, 0]], [True, True])
    [0, 1]
    """
    values = np.asarray(points, dtype=np.float64)
    signs = np.where(np.asarray(higher_is_better, bool), 1.0, -1.0)
    if values.ndim != 2 or values.shape[1] != len(signs):
        raise ValueError(
            f"`points` must be a list of {len(signs)} values each. Received: shape {values.shape}"
        )
    oriented = values * signs
    front = []
    for i, point in enumerate(oriented):
        dominated = np.any(np.all(oriented >= point, axis=1) & np.any(oriented > point, axis=1))
        if not dominated:
            front.append(i)
    return front


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A static-weight sweep: every candidate's scores, and the one chosen on validation.

    `validation`, `validation_std` and `seconds_per_epoch` are read from `results`.

    Attributes:
        tasks: the task names.
        weights: `[{task: weight}]`, the candidates in order.
        validation: `[{task: {metric: mean over seeds}}]` on the validation
            split, per candidate: what the choice reads.
        validation_std: the same, standard deviations (`ddof=0`).
        test: `[{task: {metric: mean}}]` on the test split, per candidate,
            computed after the choice (None with `test=False`): for reports
            and the trade-off plot's front, never for choosing.
        test_std: the same, standard deviations (or None).
        scores: the selection score of each candidate (lower is better).
        chosen: the index of the chosen candidate.
        selection: `"delta_m"` or `"mean_rank"`.
        splits: `{"train": ..., "validation": ...}`, the splits trained and
            validated on.
        results: `[kmtl.experiment.Result]` of each candidate.
        seconds_per_epoch: mean seconds per epoch of each candidate.
        refit: the `kmtl.experiment.Result` of the chosen weights retrained
            on all the training examples (validation split included), every
            seed, reported on the test split; None with `refit=False` or
            `test=False`. The tuned static baseline to compare with.
    """

    tasks: list
    weights: list
    test: list | None
    test_std: list | None
    scores: list
    chosen: int
    selection: str
    splits: dict
    results: list
    refit: object = None

    @property
    def validation(self) -> list:
        return [result.mean for result in self.results]

    @property
    def validation_std(self) -> list:
        return [result.std for result in self.results]

    @property
    def seconds_per_epoch(self) -> list:
        return [result.mean_seconds_per_epoch for result in self.results]

    @property
    def chosen_weights(self) -> dict:
        """`{task: weight}` of the chosen candidate."""
        return dict(self.weights[self.chosen])

    @property
    def chosen_test(self) -> dict | None:
        """`{task: {metric: mean}}` of the chosen candidate on the test split."""
        return None if self.test is None else self.test[self.chosen]

    def front(
        self, metric: str = "accuracy", split: str = "test", higher_is_better: bool = True
    ) -> list[int]:
        """Indices of the candidates on the Pareto front of `metric` over the tasks."""
        table = self.test if split == "test" else self.validation
        if table is None:
            raise ValueError("The sweep ran with test=False: it has no test scores. Received: split='test'")
        points = [[row[task][metric] for task in self.tasks] for row in table]
        return pareto_front(points, [higher_is_better] * len(self.tasks))

    def __str__(self) -> str:
        lines = [
            f"static-weight sweep over {self.tasks}: {len(self.weights)} candidates, chosen on "
            f"{self.splits['validation']} by {self.selection}"
        ]
        for i, vector in enumerate(self.weights):
            mark = "*" if i == self.chosen else " "
            weights = ", ".join(f"{t}={w:.3g}" for t, w in vector.items())
            val = _brief(self.validation[i])
            test = f"; test {_brief(self.test[i])}" if self.test is not None else ""
            lines.append(f" {mark} [{weights}] score {self.scores[i]:+.3f}; validation {val}{test}")
        return "\n".join(lines)


def _brief(row: dict) -> str:
    cells = []
    for task, metrics in row.items():
        if task == "overall":
            continue
        named = [m for m in metrics if m != "loss"] or list(metrics)
        cells.append(f"{task} " + " ".join(f"{m} {metrics[m]:.4f}" for m in named))
    return ", ".join(cells)


def _compared(row: dict, tasks: list[str]) -> list[tuple[str, str]]:
    pairs = [(t, m) for t in tasks for m in row[t] if m != "loss"]
    return pairs or [(t, "loss") for t in tasks]


def _scores(rows: list[dict], tasks: list[str], selection: str) -> list[float]:
    """Lower is better. delta_m: Δm (%) against the best candidate of each metric; mean_rank: mean rank."""
    pairs = _compared(rows[0], tasks)
    directions = delta.directions(
        pairs,
        remedy=f"the sweep selects on the metrics of {delta.HIGHER_IS_BETTER} and {delta.LOWER_IS_BETTER}",
    )
    values = np.asarray([[row[t][m] for t, m in pairs] for row in rows], dtype=np.float64)
    signs = np.asarray([1.0 if directions[p] else -1.0 for p in pairs])
    if selection == "mean_rank":  # rank 1 = best on each metric; ties share their mean rank
        from scipy.stats import rankdata

        ranks = rankdata(-values * signs, method="average", axis=0)
        return [float(r) for r in ranks.mean(axis=1)]
    best = {}
    for j, pair in enumerate(pairs):
        column = values[:, j]
        best[pair] = float(column.max() if directions[pair] else column.min())
    reference = {}
    for (task, metric), value in best.items():
        reference.setdefault(task, {})[metric] = value
    metrics = {}
    for task, metric in pairs:
        metrics.setdefault(task, []).append(metric)
    return [float(delta.delta_m(row, reference, metrics=metrics).delta_m) for row in rows]


def static_weight_sweep(
    config: str | os.PathLike | Mapping,
    grid=None,
    validation: float = VALIDATION_FRACTION,
    selection: str = "delta_m",
    test: bool = True,
    refit: bool = True,
    seed: int = 0,
    force: bool = False,
    out: str | os.PathLike | None = None,
    verbose: int | str | None = None,
    resume: bool = True,
) -> Sweep:
    """Trains fixed loss weights on a grid and chooses the best on a validation split.

    The tuned static scalarisation, the baseline the literature asks for
    (Xin et al. 2022; Kurin et al. 2022). Each candidate is the config with
    `loss_weights` set to one weight vector, no `weighting` strategy and
    every seed of the config, trained on the training examples minus a
    held-out validation split: the last `validation` fraction of the
    training examples (of the first `train_limit` ones when the config has
    `train_limit`). `fit` validates on that split and the candidate's report
    is computed on it (`test_split`), so training and choosing never read the
    test split. The chosen candidate has the lowest score on validation:

    - `"delta_m"`: Δm (`kmtl.evaluation.delta_m`, %) of the candidate against
      the best validation value any candidate reached on each metric (every
      metric but `loss`, or the losses when there is no other): the relative
      gap to the best, averaged over the metrics. With a fixed reference
      this orders the candidates as Δm against single-task baselines does,
      up to each metric's scale.
    - `"mean_rank"`: the candidate's rank on each metric (1 = best), averaged.

    Ties go to the earlier candidate. With `test=True`, every candidate's
    saved models are evaluated on the test split *after* the choice, for
    reports and for the front of the trade-off plot (`kmtl.plots.plot_tradeoff`).

    Candidates run through `kmtl.experiment.run` under the names
    `<name>-static-<w1>-<w2>...` (`<name>`: the config's `name`, else
    `<dataset>-<hash>`), so they are cached; the test scores are cached in
    each seed's `test_metrics.json`.

    Args:
        config: what `kmtl.experiment.load_config` accepts; 2 or more tasks.
        grid: None (the simplex lattice `simplex_grid(tasks, 6)` for 2-3 tasks,
            else `10` random vectors); an int (the lattice resolution for 2-3
            tasks, else the number of random vectors: the uniform vector, then
            Dirichlet(1) draws from `seed`, scaled to sum to T); or a list of
            weight vectors, each `{task: weight}` or a list in task order.
        validation: the fraction of the training examples held out, in (0, 1).
        selection: `"delta_m"` or `"mean_rank"`.
        test: evaluate every candidate on the test split after the choice.
        refit: with `test`, retrain the chosen weights on all the training
            examples (as the experiment `<name>-static-refit`, validating on
            the held-out split) and report it on the test split: the row to
            compare with the strategies, which also train on all of them.
        seed: seed of the random candidates.
        force: retrain even if cached.
        out: parent directory of the runs (default: the config's `out`).
        verbose: Keras `fit` verbosity (default: the config's).
        resume: as for `single_task_baselines`.

    Returns:
        A `Sweep`.

    Raises:
        ValueError: for a bad config, fewer than two tasks, a bad `grid`
            (weights that do not name the config's tasks, negative or
            non-finite weights, an all-zero or repeated vector), `validation`
            or `selection`, or a config with `train_split` (the sweep sets it).
    """
    config = experiment.load_config(config)
    tasks = _task_list(config["tasks"])
    if selection not in _SELECTIONS:
        raise ValueError(f"`selection` must be one of {list(_SELECTIONS)}. Received: selection={selection!r}")
    vectors = _candidate_vectors(grid, tasks, seed)
    train_split, validation_split = _holdout_splits(config, validation)
    base = _base_name(config)
    progress = experiment.Progress("static-weight sweep", len(vectors))
    results = []
    for vector in vectors:
        label = "-".join(f"{w:.3g}" for w in vector.values())
        progress.begin("weights " + ", ".join(f"{t}={w:.3g}" for t, w in vector.items()))
        candidate = dict(
            config,
            loss_weights=dict(vector),
            weighting=None,
            train_limit=None,
            train_split=train_split,
            validation=validation_split,
            test_split=validation_split,
            name=f"{base}-static-{label}",
        )
        results.append(experiment.run(candidate, force=force, out=out, verbose=verbose, resume=resume))
        progress.end()
    scores = _scores([result.mean for result in results], tasks, selection)
    chosen = int(np.argmin(scores))
    test_mean = test_std = None
    if test:
        test_mean, test_std = [], []
        for result in results:
            mean, std = _test_scores(result, config, fresh=force or not result.from_cache)
            test_mean.append(mean)
            test_std.append(std)
    refitted = None
    if test and refit:
        refitted = experiment.run(
            dict(
                config,
                loss_weights=dict(vectors[chosen]),
                weighting=None,
                validation=validation_split,
                name=f"{base}-static-refit",
            ),
            force=force,
            out=out,
            verbose=verbose,
            resume=resume,
        )
    return Sweep(
        tasks=tasks,
        weights=vectors,
        test=test_mean,
        test_std=test_std,
        scores=scores,
        chosen=chosen,
        selection=selection,
        splits={"train": train_split, "validation": validation_split},
        results=results,
        refit=refitted,
    )


def _test_scores(result, config: dict, fresh: bool) -> tuple[dict, dict]:
    """Each seed's saved model on the test split (cached in `test_metrics.json`); mean and std.

    `fresh`: the candidate was (re)trained now, so a cached file may be stale.
    """
    per_seed = {}
    for seed in result.per_seed:
        seed_dir = Path(result.run_dir) / f"seed-{seed}"
        cached = seed_dir / "test_metrics.json"
        if cached.is_file() and not fresh:
            try:
                per_seed[seed] = json.loads(cached.read_text(encoding="utf-8"))
                continue
            except (OSError, ValueError):
                pass
        per_seed[seed] = _evaluate_saved(seed_dir / "model.keras", config)
        experiment.write_json_atomic(cached, per_seed[seed])
    return experiment.summarize(per_seed)


def _evaluate_saved(path: Path, config: dict) -> dict:
    import kmtl
    from kmtl import data, export

    model = export.load_keras(path)
    split = config["test_split"] or "test"
    test = data.task_dataset(
        config["dataset"],
        config["tasks"],
        split=split,
        batch_size=512,
        source=config["source"],
        data_dir=config["data_dir"],
    )
    return kmtl.evaluate(model, test).to_dict()
