"""Task-relationship diagnostics: gradient conflicts and lookahead affinity.

Two measures of how the tasks of a `kmtl.MultiTaskModel` interact through its
shared variables:

* **Gradient cosines** (`gradient_cosines`, `GradientConflictMonitor`): the
  cosine similarity between two tasks' loss gradients. It is negative when
  the tasks conflict (one task's step increases the other's loss to first
  order). PCGrad, CAGrad, MGDA and the other gradient-level strategies exist
  for that case.
* **Inter-task affinity** (`task_affinity`, `TaskAffinityMonitor`): the
  relative change of task j's loss after an SGD step on the shared variables
  for task i alone (Fifty et al., 2021). It is not symmetric, and it measures
  the step's effect exactly rather than to first order.

Their log keys are made by `cosine_key` and `affinity_key`;
`kmtl.plots.plot_affinity` and `kmtl.plots.plot_pairwise_over_time` draw them.

Example:

>>> conflicts = kmtl.diagnostics.gradient_cosines(model, test.take(4))   # doctest: +SKIP
>>> conflicts[("digit", "parity")]                                          # doctest: +SKIP
-0.12
>>> affinity = kmtl.diagnostics.task_affinity(model, test.take(4))        # doctest: +SKIP
>>> affinity[("digit", "parity")]                                           # doctest: +SKIP
0.004
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence

import keras
import numpy as np

COSINE_PREFIX = "cos_"
AFFINITY_PREFIX = "affinity_"


def cosine_key(task_a: str, task_b: str) -> str:
    """The log key of the gradient cosine of two tasks: `cos_<a>_<b>`."""
    return f"{COSINE_PREFIX}{task_a}_{task_b}"


def affinity_key(source: str, target: str) -> str:
    """The log key of the affinity of `source` onto `target`: `affinity_<source>_<target>`."""
    return f"{AFFINITY_PREFIX}{source}_{target}"


def _trained_tasks(model, caller: str) -> list[str]:
    """The trained task names of a compiled `MultiTaskModel` with at least two of them."""
    from kmtl.model import MultiTaskModel

    if not isinstance(model, MultiTaskModel):
        raise ValueError(f"{caller} needs a compiled kmtl.MultiTaskModel. Received: {type(model).__name__}")
    if not model.compiled or getattr(model, "objective", None) is None:
        raise ValueError(
            f"{caller} needs a compiled kmtl.MultiTaskModel; call `model.compile(...)` first. "
            f"Received: an uncompiled {type(model).__name__}"
        )
    names = list(model.objective.task_names)
    if len(names) < 2:
        raise ValueError(f"{caller} needs at least two trained tasks. Received: {names}")
    return names


def _check_steps(steps):
    if steps is None:
        return None
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be None or a positive integer. Received: steps={steps!r}")
    return int(steps)


def _check_learning_rate(value, source: str = "learning_rate") -> float:
    try:
        rate = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        rate = None
    if rate is None or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"The learning rate must be a finite number > 0. Received: {source}={value!r}")
    return rate


def _learning_rate(model, learning_rate) -> float:
    """`learning_rate` if given, else the model optimizer's current learning rate."""
    if learning_rate is not None:
        return _check_learning_rate(learning_rate)
    optimizer = getattr(model, "optimizer", None)
    try:
        current = float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(
            "Cannot read the optimizer's learning rate; pass `learning_rate=` explicitly. "
            f"Received: optimizer={type(optimizer).__name__} ({error})"
        ) from None
    return _check_learning_rate(current, source="optimizer.learning_rate")


def gradient_cosines(model, dataset, steps: int | None = None) -> dict:
    """Pairwise cosine similarity of the tasks' shared-parameter gradients.

    The gradients are summed over the batches of `dataset` (so the cosine is
    that of the full-data gradients, not an average of per-batch cosines).

    Args:
        model: a compiled `kmtl.MultiTaskModel`.
        dataset: a `tf.data.Dataset` yielding `(x, {task: y})` or
            `(x, {task: y}, {task: weight})`.
        steps: number of batches (default: the whole dataset).

    Returns:
        `{(task_a, task_b): cosine}` for every pair `a < b` in head order;
        a pair where either gradient is zero gets `nan`.

    Raises:
        ValueError: if the model is not a compiled `MultiTaskModel` with at
            least two trained tasks, or the dataset is empty.
    """
    from kmtl import backend

    names = _trained_tasks(model, "gradient_cosines")
    total = None
    for i, batch in enumerate(dataset):
        if steps is not None and i >= steps:
            break
        part = np.asarray(backend.shared_task_gradients(model, batch), dtype="float64")
        total = part if total is None else total + part
    if total is None:
        raise ValueError("gradient_cosines received an empty dataset.")
    gram = total @ total.T
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    result = {}
    for a, b in itertools.combinations(range(len(names)), 2):
        denominator = norms[a] * norms[b]
        result[(names[a], names[b])] = float(gram[a, b] / denominator) if denominator > 0 else float("nan")
    return result


def _batch_affinity(model, batch, rate, names, static_weights, positions):
    """`(Z, valid)`: `[T, T]` lookahead affinities of one batch and where they are defined."""
    from kmtl import backend

    objective = model.objective
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    targets, weights = objective.prepare(y, sample_weight)
    # Gradients of the static-weighted shares; divided by the weight, each task's own loss.
    gradients = keras.ops.convert_to_numpy(backend.shared_task_gradients(model, batch)).astype("float64")
    gradients = gradients / static_weights[:, None]
    current = [keras.ops.convert_to_tensor(v) for v in model.trainable_variables]
    fixed = [keras.ops.convert_to_tensor(v) for v in model.non_trainable_variables]

    def task_losses(trainable_values):
        outputs, _ = model.stateless_call(trainable_values, fixed, x, training=False)
        losses = objective.task_losses(targets, outputs, weights)
        return (
            keras.ops.convert_to_numpy(losses.raw_values).astype("float64"),
            keras.ops.convert_to_numpy(losses.present).astype(bool),
        )

    base, present = task_losses(current)
    bad = [n for n, value, p in zip(names, base, present) if p and (not np.isfinite(value) or value == 0)]
    if bad:
        received = {n: float(v) for n, v in zip(names, base)}
        raise ValueError(
            "task_affinity divides by each task's loss before the step, which must be finite and "
            f"non-zero; the loss of {bad} is not. Received: losses {received}"
        )
    affinity = np.zeros((len(names), len(names)))
    for i in range(len(names)):
        if not present[i]:
            continue
        values = list(current)
        offset = 0
        for variable, position in positions:
            size = int(np.prod(variable.shape))
            step = gradients[i, offset : offset + size].reshape(tuple(variable.shape))
            offset += size
            values[position] = keras.ops.subtract(
                current[position], keras.ops.convert_to_tensor(rate * step, variable.dtype)
            )
        after, _ = task_losses(values)
        # Absent tasks (no labelled example) have no ratio; `valid` leaves them out.
        affinity[i] = 1.0 - np.divide(after, base, out=np.ones_like(base), where=present)
    valid = np.outer(present, present) & ~np.eye(len(names), dtype=bool)
    return affinity, valid


def task_affinity(model, dataset, steps: int | None = None, learning_rate: float | None = None) -> dict:
    """Lookahead inter-task affinity: how much a step for task i lowers task j's loss.

    For each batch, each trained task i, and the shared variables θ_s (the
    task-specific variables θ_j stay as they are):

        θ_s|i = θ_s - η ∇_{θ_s} L_i(θ_s, θ_i)
        Z_{i→j} = 1 - L_j(θ_s|i, θ_j) / L_j(θ_s, θ_j)

    on the same batch, with L the task's unweighted loss (static loss
    weights are divided out of the gradient, and cancel in the ratio).
    Positive: a step for task i lowers task j's loss; negative: it raises it.
    The result is the plain mean of the per-batch Z over the batches (each
    batch counts once, whatever its size), as the paper averages per-step
    affinities over training. A batch where task i or task j has no labelled
    example (all its sample weights 0) is left out of that pair's mean; a pair
    with no batch left gets `nan`.

    Losses and gradients are computed in inference mode (no dropout, moving
    batch-norm statistics), the lookahead with `model.stateless_call`, so no
    variable of the model, its optimizer, trackers or strategy changes.
    Regularization losses (`model.losses`) are not part of L.

    Args:
        model: a compiled `kmtl.MultiTaskModel` with at least two trained
            tasks, each with a loss weight > 0.
        dataset: a `tf.data.Dataset` (or any iterable of batches) yielding
            `(x, {task: y})` or `(x, {task: y}, {task: weight})`.
        steps: number of batches (default: the whole dataset).
        learning_rate: the lookahead step size η (a number > 0). Default:
            the model optimizer's current learning rate
            (`model.optimizer.learning_rate`, a schedule evaluated at the
            current iteration). The SGD step ignores momentum and other
            optimizer state, as in the paper's definition.

    Returns:
        `{(source, target): Z}` for every ordered pair of distinct trained
        tasks, in head order. `affinity_matrix` turns it into a `[T, T]`
        array.

    Raises:
        ValueError: for a model that is not a compiled `MultiTaskModel`,
            fewer than two trained tasks, a task with loss weight 0, a model
            without shared trainable variables, an empty dataset, a bad
            `steps`, a learning rate that is not a finite number > 0 or
            cannot be read from the optimizer, or a batch where a task's
            loss before the step is 0 or not finite.

    Example:

    >>> affinity = kmtl.diagnostics.task_affinity(model, test.take(8))     # doctest: +SKIP
    >>> affinity[("digit", "parity")], affinity[("parity", "digit")]      # doctest: +SKIP
    (0.004, -0.001)
    >>> matrix, tasks = kmtl.diagnostics.affinity_matrix(affinity)          # doctest: +SKIP

    References:
        Fifty, C., Amid, E., Zhao, Z., Yu, T., Anil, R. & Finn, C. (2021).
        Efficiently Identifying Task Groupings for Multi-Task Learning.
        NeurIPS. https://arxiv.org/abs/2109.04617
    """
    names = _trained_tasks(model, "task_affinity")
    steps = _check_steps(steps)
    rate = _learning_rate(model, learning_rate)
    static_weights = np.asarray(model.objective.static_weights, dtype="float64")
    if np.any(static_weights <= 0):
        zero = [n for n, w in zip(names, static_weights) if w <= 0]
        raise ValueError(
            f"task_affinity steps on each task's own loss, which a loss weight of 0 hides; give "
            f"{zero} a positive weight, or compile with loss={{name: None}} to leave them out. "
            f"Received: loss_weights={dict(zip(names, static_weights.tolist()))}"
        )
    shared = model.shared_variables
    index = {id(v): k for k, v in enumerate(model.trainable_variables)}
    if not shared or any(id(v) not in index for v in shared):
        raise ValueError(
            "task_affinity needs the model's shared variables among its trainable variables. "
            f"Received: {len(shared)} shared variables, {len(index)} trainable variables"
        )
    positions = [(v, index[id(v)]) for v in shared]
    total = np.zeros((len(names), len(names)))
    counts = np.zeros((len(names), len(names)))
    batches = 0
    for i, batch in enumerate(dataset):
        if steps is not None and i >= steps:
            break
        batches += 1
        values, valid = _batch_affinity(model, batch, rate, names, static_weights, positions)
        total += np.where(valid, values, 0.0)
        counts += valid
    if not batches:
        raise ValueError("task_affinity received an empty dataset.")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
    return {(names[i], names[j]): float(mean[i, j]) for i, j in itertools.permutations(range(len(names)), 2)}


def affinity_matrix(affinity, tasks: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """`(matrix, tasks)`: affinities as a `[T, T]` array, source on rows, target on columns.

    Args:
        affinity: the dict of `task_affinity` (`{(source, target): Z}`), or
            a square array (returned as a float array).
        tasks: task order (default for a dict: the order of its keys; for an
            array: `"0"`, `"1"`, ...).

    Returns:
        `(matrix, tasks)`; the diagonal and missing pairs are `nan`.

    Raises:
        ValueError: for an empty dict, keys that are not `(source, target)`
            pairs of the tasks, or an array that is not square or does not
            match `tasks`.

    Example:

    >>> matrix, tasks = kmtl.diagnostics.affinity_matrix({("a", "b"): 0.1, ("b", "a"): -0.2})
    >>> tasks, matrix.tolist()
    (['a', 'b'], [[nan, 0.1], [-0.2, nan]])
    """
    if isinstance(affinity, Mapping):
        if not affinity or not all(isinstance(k, tuple) and len(k) == 2 for k in affinity):
            raise ValueError(
                f"Expected a dict of (source, target) pairs from task_affinity. Received: keys {list(affinity)}"
            )
        names = (
            list(tasks) if tasks is not None else list(dict.fromkeys(t for pair in affinity for t in pair))
        )
        position = {name: k for k, name in enumerate(names)}
        unknown = sorted({t for pair in affinity for t in pair} - set(position))
        if unknown:
            raise ValueError(
                f"Affinity pairs name tasks {unknown} that are not in {names}. Received: tasks={tasks}"
            )
        matrix = np.full((len(names), len(names)), np.nan)
        for (source, target), value in affinity.items():
            if source != target:
                matrix[position[source], position[target]] = float(value)
        return matrix, names
    matrix = np.array(affinity, dtype="float64")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.size:
        raise ValueError(f"Expected a square [T, T] affinity matrix. Received: shape {matrix.shape}")
    names = [str(k) for k in range(len(matrix))] if tasks is None else list(tasks)
    if len(names) != len(matrix):
        raise ValueError(
            f"Expected {len(matrix)} task names for a {matrix.shape} matrix. Received: tasks={tasks}"
        )
    return matrix, names


def _check_every(every):
    valid = isinstance(every, numbers.Real) and not isinstance(every, bool) and math.isfinite(every)
    if not valid or int(every) != every or every < 1:
        raise ValueError(f"`every` must be a positive integer. Received: every={every!r}")
    return int(every)


@keras.saving.register_keras_serializable(package="kmtl")
class GradientConflictMonitor(keras.callbacks.Callback):
    """Logs the pairwise gradient cosines as `cos_<a>_<b>` at the end of epochs.

    Args:
        data: a small `tf.data.Dataset` (a few batches) to measure on.
        steps: batches of `data` to use (default: all).
        every: measure every `every` epochs.

    The values appear in the `History` (e.g. `history.history["cos_digit_parity"]`)
    and in the progress bar; the keys are made by `cosine_key`.
    """

    def __init__(self, data, steps: int | None = None, every: int = 1):
        super().__init__()
        self.data = data
        self.steps = steps
        self.every = _check_every(every)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        for (a, b), value in gradient_cosines(self.model, self.data, self.steps).items():
            logs[cosine_key(a, b)] = value

    def get_config(self):
        return {"steps": self.steps, "every": self.every}


@keras.saving.register_keras_serializable(package="kmtl")
class TaskAffinityMonitor(keras.callbacks.Callback):
    """Logs the lookahead affinities as `affinity_<source>_<target>` at the end of epochs.

    Runs `task_affinity` on `data` with the model as it is at the end of the
    epoch, and writes one value per ordered pair of tasks into the epoch's
    logs, so they appear in the `History` (e.g.
    `history.history["affinity_digit_parity"]`) and in the progress bar. The
    keys are made by `affinity_key`. The paper averages affinities over the
    steps of training; this monitor samples them once per `every` epochs.

    Args:
        data: a small `tf.data.Dataset` (a few batches) to measure on.
        steps: batches of `data` to use (default: all).
        every: measure every `every` epochs (skipped epochs log nothing).
        learning_rate: the lookahead step size; default: the optimizer's
            current learning rate at each measurement.

    Raises:
        ValueError: for a bad `steps`, `every` or `learning_rate`; when
            training begins, for a model `task_affinity` cannot measure.

    Example:

    >>> monitor = kmtl.diagnostics.TaskAffinityMonitor(test.take(4))              # doctest: +SKIP
    >>> history = model.fit(train, epochs=3, callbacks=[monitor])                  # doctest: +SKIP
    >>> kmtl.plots.plot_pairwise_over_time(history, kind="affinity")               # doctest: +SKIP

    References:
        Fifty, C., Amid, E., Zhao, Z., Yu, T., Anil, R. & Finn, C. (2021).
        Efficiently Identifying Task Groupings for Multi-Task Learning.
        NeurIPS. https://arxiv.org/abs/2109.04617
    """

    def __init__(self, data, steps: int | None = None, every: int = 1, learning_rate: float | None = None):
        super().__init__()
        self.data = data
        self.steps = _check_steps(steps)
        self.every = _check_every(every)
        self.learning_rate = None if learning_rate is None else _check_learning_rate(learning_rate)

    def on_train_begin(self, logs=None):
        # Fail before the first epoch rather than after it.
        _trained_tasks(self.model, "TaskAffinityMonitor")
        _learning_rate(self.model, self.learning_rate)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        affinity = task_affinity(self.model, self.data, self.steps, self.learning_rate)
        for (source, target), value in affinity.items():
            logs[affinity_key(source, target)] = value

    def get_config(self):
        return {"steps": self.steps, "every": self.every, "learning_rate": self.learning_rate}

    @classmethod
    def from_config(cls, config):
        """Rebuilds the monitor; the dataset is not part of the config, pass it as `data`."""
        if "data" not in config:
            raise ValueError(
                "A TaskAffinityMonitor config holds no dataset; pass it: "
                f"TaskAffinityMonitor.from_config({{**config, 'data': dataset}}). Received: keys {sorted(config)}"
            )
        return cls(**config)


__all__ = [
    "AFFINITY_PREFIX",
    "COSINE_PREFIX",
    "GradientConflictMonitor",
    "TaskAffinityMonitor",
    "affinity_key",
    "affinity_matrix",
    "cosine_key",
    "gradient_cosines",
    "task_affinity",
]
