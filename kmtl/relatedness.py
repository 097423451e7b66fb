"""Task relatedness: which tasks of a set gain from being trained together.

`relatedness_report` trains, on one budget, a single-task model per task, the
model of all the tasks and (with `pairs=True`) a model of every pair, and
reports for every pair of tasks three measures of how related they are:

* **Δm** of the pair trained together against each task trained alone
  (`kmtl.delta.delta_m` on the test scores; negative = sharing helped). It is
  the outcome that matters, and the most expensive and noisiest to measure.
* **Gradient cosine** of the two tasks' gradients of the shared variables
  (`kmtl.diagnostics.gradient_cosines`, one batch at a time) and the fraction
  of measured batches where it is negative (the tasks conflict).
* **Lookahead affinity** (`kmtl.diagnostics.task_affinity`, Fifty et al.
  2021): how much a step on the shared variables for one task lowers the
  other's loss, both directions and their mean.

The cosines and affinities are measured in the model of all the tasks, at the
end of every epoch of its training, on a fixed set of training batches, so
every pair is measured on the same shared trunk; each statistic is the mean
over the measurements and then over the seeds. `RelatednessReport.ranking`
orders the pairs by one measure, `to_markdown` prints them, `heatmap` draws
one as a T x T matrix.

**Budget.** Every model (single-task, pair, all tasks) is trained for the
same `epochs` passes over the whole training set with the same `batch_size`,
optimizer settings and seed: the same number of optimizer steps,
`epochs * ceil(num_examples / batch_size)`, and the same examples. There is
no early stopping and no validation split; the test split is only scored at
the end.

Example:

>>> from kmtl import data, relatedness
>>> cosines = [[1, 0.95, 0.2], [0.95, 1, 0.55], [0.2, 0.55, 1]]
>>> train = data.synthetic_tasks(3, cosines, num_examples=3000, seed=0)
>>> test = data.synthetic_tasks(3, cosines, num_examples=1000, seed=1)
>>> report = relatedness.relatedness_report(data.synthetic_heads(3), train, test)  # doctest: +SKIP
>>> [pair.tasks for pair in report.ranking(by="cosine")]  # doctest: +SKIP
[('task_0', 'task_1'), ('task_1', 'task_2'), ('task_0', 'task_2')]

References:
    Fifty, C., Amid, E., Zhao, Z., Yu, T., Anil, R. & Finn, C. (2021).
    Efficiently Identifying Task Groupings for Multi-Task Learning.
    NeurIPS. https://arxiv.org/abs/2109.04617
    Yu, T., Kumar, S., Gupta, A., Levine, S., Hausman, K. & Finn, C. (2020).
    Gradient Surgery for Multi-Task Learning. NeurIPS (gradient cosines).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np

from kmtl import delta as delta_module
from kmtl import diagnostics, evaluation, experiment
from kmtl import heads as heads_module
from kmtl._fresh import fresh

#: The measures `RelatednessReport.ranking` and `heatmap` accept.
MEASURES = ("affinity", "cosine", "delta_m")

__all__ = ["MEASURES", "Budget", "PairRelatedness", "RelatednessReport", "relatedness_report"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """The training budget every model of a report got.

    Attributes:
        epochs: passes over the training set.
        batch_size: examples per optimizer step (None: the dataset's batches).
        steps_per_epoch: optimizer steps per epoch (None if not known).
        examples: training examples (None if not known, e.g. a dataset).
    """

    epochs: int
    batch_size: int | None
    steps_per_epoch: int | None
    examples: int | None

    def __str__(self):
        steps = "?" if self.steps_per_epoch is None else str(self.epochs * self.steps_per_epoch)
        batch = "dataset batches" if self.batch_size is None else f"batch {self.batch_size}"
        return f"{self.epochs} epochs, {batch}, {steps} steps per model"


@dataclasses.dataclass(frozen=True)
class PairRelatedness:
    """The relatedness measures of one pair of tasks (a row of `RelatednessReport.pairs`).

    Attributes:
        tasks: `(a, b)`, in head order.
        cosine: mean gradient cosine over the measured batches and seeds.
        cosine_std: standard deviation over seeds of each seed's mean cosine.
        negative_fraction: fraction of measured batches (all seeds) with a
            negative cosine.
        affinity: mean of `affinity_forward` and `affinity_backward`.
        affinity_forward: Z_{a→b}, mean over measurements and seeds.
        affinity_backward: Z_{b→a}.
        delta_m: Δm (%) of the pair trained together vs each task alone, on
            the seed means of the test scores (None without pair models).
        delta_m_std: standard deviation over seeds of the per-seed Δm.
    """

    tasks: tuple[str, str]
    cosine: float
    cosine_std: float
    negative_fraction: float
    affinity: float
    affinity_forward: float
    affinity_backward: float
    delta_m: float | None = None
    delta_m_std: float | None = None

    def relatedness(self, by: str = "affinity") -> float:
        """The value `ranking(by)` sorts on: higher is more related (`-delta_m` for Δm)."""
        _check_measure(by)
        if by == "delta_m":
            return math.nan if self.delta_m is None else -self.delta_m
        return self.affinity if by == "affinity" else self.cosine


def _check_measure(by):
    if by not in MEASURES:
        raise ValueError(f"`by` must be one of {list(MEASURES)}. Received: by={by!r}")
    return by


def _cell(value, digits=4):
    return "-" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


@dataclasses.dataclass(frozen=True)
class RelatednessReport:
    """The result of `relatedness_report`.

    Attributes:
        tasks: the task names, in head order.
        pairs: one `PairRelatedness` per pair `a < b`, in head order.
        single_task: `{task: {metric: mean over seeds}}` of the single-task models.
        multi_task: the same for the model of all the tasks.
        delta: the `kmtl.delta.Delta` of the model of all the tasks vs the
            single-task models (seed means).
        budget: the `Budget` of every model.
        seeds: the seeds.
        measurements: measured batches per seed (epochs x batches).
    """

    tasks: tuple[str, ...]
    pairs: tuple[PairRelatedness, ...]
    single_task: Mapping
    multi_task: Mapping
    delta: delta_module.Delta
    budget: Budget
    seeds: tuple[int, ...]
    measurements: int

    def pair(self, a: str, b: str) -> PairRelatedness:
        """The row of tasks `a` and `b` (in either order)."""
        for row in self.pairs:
            if set(row.tasks) == {a, b}:
                return row
        raise KeyError(f"No pair ({a!r}, {b!r}) in this report. Tasks: {list(self.tasks)}")

    def ranking(self, by: str = "affinity") -> list[PairRelatedness]:
        """The pairs from most to least related by `by` (`"affinity"`, `"cosine"` or `"delta_m"`).

        Higher affinity, higher cosine, lower Δm is more related; pairs
        without a value (Δm without pair models) come last.
        """
        _check_measure(by)

        def key(row):
            value = row.relatedness(by)
            return (0, -value) if math.isfinite(value) else (1, 0.0)

        return sorted(self.pairs, key=key)

    def matrix(self, by: str = "affinity") -> tuple[np.ndarray, list[str]]:
        """`(matrix, tasks)`: a `[T, T]` array of one measure, `nan` on the diagonal.

        `"affinity"` is directed (source task on rows, target on columns);
        `"cosine"` and `"delta_m"` (in %, positive = sharing hurt) are symmetric.
        """
        _check_measure(by)
        names = list(self.tasks)
        position = {name: k for k, name in enumerate(names)}
        matrix = np.full((len(names), len(names)), np.nan)
        for row in self.pairs:
            i, j = position[row.tasks[0]], position[row.tasks[1]]
            if by == "affinity":
                matrix[i, j], matrix[j, i] = row.affinity_forward, row.affinity_backward
            else:
                value = row.cosine if by == "cosine" else row.delta_m
                matrix[i, j] = matrix[j, i] = np.nan if value is None else value
        return matrix, names

    def to_markdown(self) -> str:
        """A markdown table of the pairs, most related (by affinity) first, and the budget."""
        lines = [
            "| pair | Δm (%) | gradient cosine | negative cosine | affinity a→b | affinity b→a | affinity |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.ranking("affinity"):
            delta_cell = _cell(row.delta_m, 2)
            if row.delta_m_std is not None and len(self.seeds) > 1:
                delta_cell += f" ± {row.delta_m_std:.2f}"
            cosine_cell = _cell(row.cosine, 3) + (f" ± {row.cosine_std:.3f}" if len(self.seeds) > 1 else "")
            lines.append(
                f"| {row.tasks[0]} · {row.tasks[1]} | {delta_cell} | {cosine_cell} | "
                f"{row.negative_fraction:.2f} | {_cell(row.affinity_forward, 5)} | "
                f"{_cell(row.affinity_backward, 5)} | {_cell(row.affinity, 5)} |"
            )
        lines += [
            "",
            f"All {len(self.tasks)} tasks together: Δm = {self.delta.delta_m:+.2f}% (negative = sharing helped). "
            f"Budget: {self.budget}; seeds {list(self.seeds)}; cosines and affinities of the all-task model "
            f"on {self.measurements} batches per seed.",
        ]
        return "\n".join(lines)

    def __str__(self):
        return self.to_markdown()

    def heatmap(self, path=None, by: str = "affinity"):
        """Draws one measure as a T x T heatmap (`kmtl.plots.plot_affinity`); saves it to `path` if given.

        Returns:
            The `matplotlib.figure.Figure`.
        """
        import matplotlib

        from kmtl import plots

        matrix, names = self.matrix(by)
        figure = plots.plot_affinity(matrix, names)
        axes = figure.axes[0]
        if by != "affinity":
            axes.set_xlabel("task")
            axes.set_ylabel("task")
            if by == "cosine":
                axes.set_title("gradient cosine (shared variables)")
                figure.axes[-1].set_ylabel("cosine")
            else:
                axes.set_title("Δm of the pair vs alone (%, negative = helped)")
                figure.axes[-1].set_ylabel("Δm (%)")
                # Δm is better when lower: blue for "sharing helped", as for the other measures.
                axes.images[0].set_cmap(matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey"))
        if path is not None:
            figure.savefig(path, dpi=120, bbox_inches="tight")
        return figure


# --- data --------------------------------------------------------------------------------


def _is_dataset(data) -> bool:
    return not isinstance(data, (tuple, list)) and hasattr(data, "element_spec")


def _task_names_of(data, side: str) -> list[str]:
    """The task keys of `(x, {task: y})` arrays or of a dataset of such batches."""
    if _is_dataset(data):
        spec = data.element_spec
        targets = spec[1] if isinstance(spec, tuple) and len(spec) >= 2 else None
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        targets = data[1]
    else:
        targets = None
    if not isinstance(targets, Mapping):
        raise ValueError(
            f"`{side}` must be `(x, {{task: y}})` arrays or a tf.data.Dataset of such batches. "
            f"Received: {side} of type {type(data).__name__}"
        )
    return [str(name) for name in targets]


def _num_examples(x) -> int:
    first = keras.tree.flatten(x)[0]
    return int(np.shape(first)[0])


def _select(data, names: list[str]):
    """`data` with the targets of `names` only."""
    if _is_dataset(data):

        def keep(*element):
            picked = [element[0], {k: element[1][k] for k in names}]
            if len(element) > 2 and isinstance(element[2], Mapping):
                picked.append({k: element[2][k] for k in names})
            return tuple(picked)

        return data.map(keep)
    x, y = data
    return x, {k: y[k] for k in names}


def _fit_arguments(data, batch_size):
    if _is_dataset(data):
        return (data,), {}
    x, y = data
    return (x, y), {"batch_size": batch_size, "shuffle": True}


def _measurement_batches(train, count: int, batch_size: int, seed: int) -> list:
    """`count` training batches, the same for every measurement of a seed."""
    if _is_dataset(train):
        return list(train.take(count))
    x, y = train
    size = _num_examples(x)
    order = np.random.default_rng([seed, 7]).permutation(size)
    batches = []
    for k in range(count):
        rows = order[(k * batch_size) % size :][:batch_size]
        if len(rows) == 0:
            break
        batches.append(
            (
                keras.tree.map_structure(lambda a, rows=rows: np.asarray(a)[rows], x),
                {t: np.asarray(v)[rows] for t, v in y.items()},
            )
        )
    return batches


# --- training ----------------------------------------------------------------------------


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def _compile_arguments(options: Mapping, names: list[str], all_names: list[str]) -> dict:
    """The compile options for the model of `names`: fresh objects, per-head dicts cut to its heads."""
    arguments = {}
    for key, value in options.items():
        if key == "weighting" and len(names) == 1:
            continue  # a single task has nothing to weight
        if isinstance(value, Mapping) and value and set(value) <= set(all_names):
            value = {k: v for k, v in value.items() if k in names}
        arguments[key] = fresh(value)
    arguments.setdefault("optimizer", "adam")
    return arguments


class _Probe(keras.callbacks.Callback):
    """Measures per-batch gradient cosines and the lookahead affinity at the end of every epoch."""

    def __init__(self, batches, learning_rate):
        super().__init__()
        self.batches = batches
        self.learning_rate = learning_rate
        self.cosines = {}
        self.affinities = []

    def on_epoch_end(self, epoch, logs=None):
        for batch in self.batches:
            for pair, value in diagnostics.gradient_cosines(self.model, [batch]).items():
                self.cosines.setdefault(pair, []).append(value)
        self.affinities.append(
            diagnostics.task_affinity(self.model, self.batches, learning_rate=self.learning_rate)
        )


def _scores(report) -> dict:
    return {task: dict(report[task]) for task in report}


def _mean_scores(per_seed: list[dict]) -> dict:
    """The mean over seeds of `{task: {metric: value}}` (`kmtl.experiment.summarize`)."""
    return experiment.summarize(dict(enumerate(per_seed)))[0]


def relatedness_report(
    heads: Sequence,
    train,
    test,
    *,
    build_fn: Callable[[list], keras.Model] | None = None,
    trunk=None,
    input_shape: Sequence[int] | None = None,
    architecture: str = "hard_sharing",
    epochs: int = 5,
    batch_size: int = 64,
    seeds: Sequence[int] = (0,),
    pairs: bool = True,
    affinity_steps: int = 4,
    affinity_learning_rate: float | None = None,
    compile_options: Mapping | None = None,
    verbose: int = 0,
) -> RelatednessReport:
    """Trains a task set alone, in pairs and all together, and measures how related each pair is.

    For each seed: one single-task model per task, the model of all the
    tasks and, with `pairs=True`, one model per pair (for two tasks the pair
    is the model of all the tasks), each trained on the same budget (see the
    module docstring) and scored on `test`. During the training of the model
    of all the tasks, at the end of every epoch, on `affinity_steps` fixed
    training batches of `batch_size`:

    - per batch, the cosine of each pair's gradients of the shared variables
      (`kmtl.diagnostics.gradient_cosines` on that batch alone);
    - the lookahead affinity Z_{i→j} (`kmtl.diagnostics.task_affinity`,
      averaged over the batches).

    `cosine` is the mean of the per-batch cosines over epochs, batches and
    seeds, `negative_fraction` the fraction of them below 0; `affinity` the
    mean over epochs and seeds of Z_{a→b} and Z_{b→a}, then of the two
    directions. `delta_m` is `kmtl.delta.delta_m` of the pair model's test
    scores against the single-task models' (means over seeds; every metric
    of the heads but the loss), so negative means the pair gained from
    being trained together.

    Args:
        heads: the `kmtl.heads.Head` of every task (at least two); their
            names must be the target keys of `train` and `test`.
        train: `(x, {task: y})` arrays, or a `tf.data.Dataset` of such
            batches (then `batch_size` only sizes nothing: the dataset's
            batches are used for training and measuring).
        test: the same form, scored after training.
        build_fn: optional `build_fn(heads) -> kmtl.MultiTaskModel`
            (uncompiled), called with a subset of `heads` (one head for a
            single-task model). Default: `kmtl.build_model(heads, trunk,
            input_shape, architecture)`, with `architecture="hard_sharing"`
            for the single-task models.
        trunk: the trunk of the default builder (default: build_model's).
        input_shape: the input shape of the default builder (default: read
            from `train`).
        architecture: the architecture of the default builder's multi-task models.
        epochs: the training budget, passes over `train`.
        batch_size: examples per step (arrays).
        seeds: every model is trained once per seed (`keras.utils.set_random_seed`).
        pairs: also train every pair of tasks together, for the per-pair Δm.
        affinity_steps: training batches the cosines and affinities are
            measured on at the end of every epoch.
        affinity_learning_rate: the lookahead step of `task_affinity`
            (default: the optimizer's learning rate).
        compile_options: `model.compile` arguments (default
            `{"optimizer": "adam"}`); optimizer and strategy objects are
            copied for each model, per-head dicts cut to its heads, and a
            `weighting` is left out of the single-task models.
        verbose: 0 silent, 1 one line per trained model, 2 also Keras's
            progress.

    Returns:
        A `RelatednessReport`.

    Raises:
        ValueError: for fewer than two heads, task names of `train` or
            `test` that differ from the heads', a non-positive `epochs`,
            `batch_size` or `affinity_steps`, no seeds, or a `build_fn`
            that does not return a `kmtl.MultiTaskModel` of the heads given.

    Example:

    >>> report = kmtl.relatedness.relatedness_report(                  # doctest: +SKIP
    ...     kmtl.data.synthetic_heads(3), train, test, trunk=kmtl.trunks.dense((32,)), epochs=4)
    >>> print(report.to_markdown())                                    # doctest: +SKIP
    >>> report.heatmap("affinity.png", by="affinity")                  # doctest: +SKIP
    """
    from kmtl.model import MultiTaskModel, build_model

    head_list = heads_module.validate(heads)
    names = [h.name for h in head_list]
    if len(names) < 2:
        raise ValueError(f"Relatedness needs at least two tasks. Received: heads={names}")
    for side, data in (("train", train), ("test", test)):
        found = _task_names_of(data, side)
        if sorted(found) != sorted(names):
            raise ValueError(
                f"The tasks of `{side}` must be the heads' tasks {names}. Received: {side} tasks={found}"
            )
    epochs = _positive_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    affinity_steps = _positive_int(affinity_steps, "affinity_steps")
    seeds = tuple(seeds) if isinstance(seeds, Sequence) else (seeds,)
    if not seeds or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in seeds
    ):
        raise ValueError(f"`seeds` must be a non-empty sequence of integers >= 0. Received: seeds={seeds!r}")
    options = dict(compile_options or {})
    if input_shape is None and build_fn is None:
        if _is_dataset(train):
            spec = train.element_spec[0]
            input_shape = tuple(spec.shape[1:]) if hasattr(spec, "shape") else None
        else:
            input_shape = tuple(np.shape(train[0])[1:]) if not isinstance(train[0], Mapping) else None
        if input_shape is None:
            raise ValueError(
                "Cannot read one input shape from `train` (several inputs): pass `build_fn`. "
                "Received: input_shape=None"
            )

    def build(subset):
        if build_fn is not None:
            model = build_fn(list(subset))
        else:
            model = build_model(
                heads=list(subset),
                trunk=trunk,
                input_shape=input_shape,
                architecture="hard_sharing" if len(subset) == 1 else architecture,
            )
        subset_names = [h.name for h in subset]
        if not isinstance(model, MultiTaskModel) or sorted(model.task_names) != sorted(subset_names):
            received = type(model).__name__ + (
                f" of tasks {model.task_names}" if isinstance(model, MultiTaskModel) else ""
            )
            raise ValueError(
                f"`build_fn` must return a kmtl.MultiTaskModel of the heads {subset_names}. Received: {received}"
            )
        return model

    examples = None if _is_dataset(train) else _num_examples(train[0])
    budget = Budget(
        epochs=epochs,
        batch_size=None if examples is None else batch_size,
        steps_per_epoch=None if examples is None else math.ceil(examples / batch_size),
        examples=examples,
    )
    position = {name: k for k, name in enumerate(names)}
    pair_list = list(itertools.combinations(names, 2))

    def train_model(subset, seed, callbacks=()):
        subset_names = [h.name for h in subset]
        keras.utils.set_random_seed(seed)
        model = build(subset)
        model.compile(**_compile_arguments(options, subset_names, names))
        args, kwargs = _fit_arguments(_select(train, subset_names), batch_size)
        model.fit(*args, epochs=epochs, verbose=1 if verbose > 1 else 0, callbacks=list(callbacks), **kwargs)
        test_args, test_kwargs = _fit_arguments(_select(test, subset_names), max(batch_size, 256))
        test_kwargs.pop("shuffle", None)
        if len(test_args) == 2:
            test_kwargs["y"] = test_args[1]
        report = evaluation.evaluate(model, test_args[0], **test_kwargs)
        if verbose:
            print(
                f"[relatedness] seed {seed}, trained {'+'.join(subset_names)}: {_brief(report)}", flush=True
            )
        return _scores(report)

    single, full, together = [], [], {pair: [] for pair in pair_list}
    cosines = {pair: [] for pair in pair_list}
    affinities = []
    for seed in seeds:
        single.append({h.name: train_model([h], seed)[h.name] for h in head_list})
        probe = _Probe(_measurement_batches(train, affinity_steps, batch_size, seed), affinity_learning_rate)
        full.append(train_model(head_list, seed, callbacks=[probe]))
        for pair in pair_list:
            cosines[pair].append(probe.cosines[pair])
        affinities.append(
            {key: float(np.mean([a[key] for a in probe.affinities])) for key in probe.affinities[0]}
        )
        if pairs:
            for pair in pair_list:
                if len(names) == 2:
                    scores = full[-1]
                else:
                    scores = train_model(
                        sorted((head_list[position[t]] for t in pair), key=lambda h: position[h.name]), seed
                    )
                together[pair].append({t: scores[t] for t in pair})

    single_mean = _mean_scores(single)
    rows = []
    for a, b in pair_list:
        per_seed = [np.mean(values) for values in cosines[(a, b)]]
        flat = np.concatenate([np.asarray(v, dtype="float64") for v in cosines[(a, b)]])
        forward = float(np.mean([s[(a, b)] for s in affinities]))
        backward = float(np.mean([s[(b, a)] for s in affinities]))
        delta_value = delta_std = None
        if pairs:
            baseline = {t: single_mean[t] for t in (a, b)}
            delta_value = delta_module.delta_m(_mean_scores(together[(a, b)]), baseline).delta_m
            delta_std = float(
                np.std(
                    [
                        delta_module.delta_m(s, {t: one[t] for t in (a, b)}).delta_m
                        for s, one in zip(together[(a, b)], single)
                    ]
                )
            )
        rows.append(
            PairRelatedness(
                tasks=(a, b),
                cosine=float(np.mean(flat)),
                cosine_std=float(np.std(per_seed)),
                negative_fraction=float(np.mean(flat < 0)),
                affinity=(forward + backward) / 2,
                affinity_forward=forward,
                affinity_backward=backward,
                delta_m=delta_value,
                delta_m_std=delta_std,
            )
        )
    full_mean = _mean_scores(full)
    return RelatednessReport(
        tasks=tuple(names),
        pairs=tuple(rows),
        single_task=single_mean,
        multi_task=full_mean,
        delta=delta_module.delta_m(full_mean, single_mean),
        budget=budget,
        seeds=tuple(int(s) for s in seeds),
        measurements=epochs * len(probe.batches),
    )


def _brief(report) -> str:
    return ", ".join(
        f"{task} " + " ".join(f"{m} {v:.4f}" for m, v in report[task].items() if m != "loss")
        for task in report
    )
