"""`TaskObjective`: what each task's loss is, how it is checked, reduced and tracked.

Built by `MultiTaskModel.compile` from the heads (and the `loss` /
`loss_weights` dicts), the objective owns, per trained task in head order:

* the loss (a `keras.losses.Loss` or a loss function) and its reduction;
* the static weight (`loss_weights`; finite and >= 0);
* target standardisation (keys, shapes, dtypes, checked at trace time) and
  value checks (label ranges, checked in the graph *before* any loss runs);
* mask handling: a zero sample weight marks a missing label, whose value is
  replaced by a valid placeholder before the loss, and the task's loss is the
  mean over its labelled examples of the *global* batch (also across
  replicas);
* its own trackers: `loss` (the static-weighted total, as `evaluate`
  reports it), `<task>_loss` (unweighted) and, in training, `<task>_weight`.

It computes, for one batch, a `TaskLosses` record: the differentiable shares
of this replica (their sum over replicas is the global loss), the global
values (no gradient, identical on every replica), the presence mask and the
finiteness of every value. The training step (`kmtl.backend`) takes it from
there; nothing here touches gradients, optimizers or Keras internals.

Example:

>>> import kmtl
>>> from kmtl import heads
>>> model = kmtl.build_model(heads=[heads.Classification("digit", 10), heads.Binary("parity")],
...                          input_shape=(8, 8, 1), trunk=kmtl.trunks.dense((16,)))
>>> model.compile(loss_weights={"parity": 0.5})
>>> model.objective.task_names, model.objective.static_weights
(['digit', 'parity'], [1.0, 0.5])
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Mapping, Sequence

import keras
from keras import ops

from kmtl import backend, logs

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


@dataclasses.dataclass
class TaskLosses:
    """The per-task losses of one batch (see the module docstring).

    Attributes:
        shares: `[T]` differentiable, static-weighted, this replica's share.
        values: `[T]` static-weighted global values (no gradient).
        raw_values: `[T]` unweighted global values (what `<task>_loss` logs).
        present: `[T]` bool, True where the global batch labels the task.
        finite: `[T]` bool, True where the task's value is finite.
        regularization_share / regularization_value: the model's added losses
            (`model.losses`) for this replica / in total; `None` if none.
        mean_weights: `[T]` how much this batch counts in each task's mean
            over batches (the global denominator of its reduction: the sum of
            its sample weights for `mean_with_sample_weight`, else its number
            of loss values), so that an epoch's `<task>_loss` is the mean over
            every labelled example of the epoch, whatever the batches held.
    """

    shares: object
    values: object
    raw_values: object
    present: object
    finite: object
    regularization_share: object = None
    regularization_value: object = None
    mean_weights: object = None

    def total_value(self):
        """Static-weighted total (plus regularization) of the global batch."""
        total = ops.sum(self.values)
        if self.regularization_value is not None:
            total = total + self.regularization_value
        return total


@keras.saving.register_keras_serializable(package="kmtl")
class TaskMeans(keras.metrics.Metric):
    """Weighted means of a `[T]` vector, one per task, in one metric.

    `result()` is `{key: mean}` for the `T` keys given, so the means appear in
    the logs under those keys (`<task>_loss`, `<task>_weight`). Two variables
    (`totals` and `counts`, shape `[T]`), one update per step whatever the
    number of tasks. `sample_weight` is one weight for every task or a `[T]`
    vector (a batch that labels task `t` for `n_t` examples counts `n_t` in
    its mean).

    Args:
        keys: the `T` log keys, in task order.
        name: the metric's own name.

    Example:

    >>> means = TaskMeans(["digit_loss", "parity_loss"])
    >>> means.update_state([0.5, 0.25], sample_weight=2.0)
    >>> {k: float(v) for k, v in means.result().items()}
    {'digit_loss': 0.5, 'parity_loss': 0.25}
    """

    def __init__(self, keys, name="task_means", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.keys = [str(k) for k in keys]
        if not self.keys or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"TaskMeans needs distinct keys. Received: keys={list(keys)!r}")
        self.totals = self.add_variable(shape=(len(self.keys),), initializer="zeros", name="totals")
        self.counts = self.add_variable(shape=(len(self.keys),), initializer="zeros", name="counts")

    def update_state(self, values, sample_weight=None):
        values = ops.reshape(ops.cast(values, self.dtype), (len(self.keys),))
        weight = ops.cast(1.0 if sample_weight is None else sample_weight, self.dtype)
        weight = ops.broadcast_to(weight, (len(self.keys),))
        # A value that does not count (weight 0) may be anything, even NaN.
        self.totals.assign_add(ops.where(weight > 0, values * weight, ops.zeros_like(values)))
        self.counts.assign_add(weight)

    def means(self):
        """The `[T]` means (0 where nothing was counted)."""
        return ops.divide_no_nan(self.totals, self.counts)

    def result(self):
        means = self.means()
        return {key: means[i] for i, key in enumerate(self.keys)}

    def get_config(self):
        return {**super().get_config(), "keys": list(self.keys)}


@keras.saving.register_keras_serializable(package="kmtl")
class TaskTotal(TaskMeans):
    """`sum_t coefficient_t * mean_t` of `TaskMeans`, logged under one key.

    The objective's `loss`: the static-weighted sum of the tasks' means over
    the epoch (each over its labelled examples) plus the mean regularization,
    so that it equals the total of the `<task>_loss` values it logs.

    Args:
        keys: one name per term (for the config; the log shows only `name`).
        coefficients: the `T` coefficients.
        name: the log key.

    Example:

    >>> total = TaskTotal(["a", "b"], [1.0, 0.5], name="loss")
    >>> total.update_state([2.0, 4.0], sample_weight=[1.0, 3.0])
    >>> float(total.result()["loss"])
    4.0
    """

    def __init__(self, keys, coefficients, name="loss", dtype=None):
        super().__init__(keys, name=name, dtype=dtype)
        self.coefficients = [float(c) for c in coefficients]
        if len(self.coefficients) != len(self.keys):
            raise ValueError(
                f"TaskTotal needs one coefficient per key. Received: keys={self.keys}, "
                f"coefficients={self.coefficients}"
            )

    def result(self):
        coefficients = ops.convert_to_tensor(self.coefficients, self.dtype)
        return {self.name: ops.sum(coefficients * self.means())}

    def get_config(self):
        return {**super().get_config(), "coefficients": list(self.coefficients)}


def _check_weight(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"Loss weight of head {name!r} must be a finite number >= 0. Received: {value!r}")
    if float(value) < 0:
        raise ValueError(f"Loss weight of head {name!r} must be >= 0. Received: {value!r}")
    return float(value)


class _TaskLoss:
    """One task's loss: per-example values and a reduction."""

    def __init__(self, name, identifier):
        if isinstance(identifier, str):
            identifier = keras.losses.get(identifier)
        if isinstance(identifier, keras.losses.Loss):
            reduction = identifier.reduction
            if reduction not in _MEAN_REDUCTIONS + ("sum",):
                raise ValueError(
                    f"The loss of head {name!r} must reduce to a scalar (reduction 'sum', "
                    f"'sum_over_batch_size' or 'mean_with_sample_weight'). Received: reduction={reduction!r}"
                )
            self.per_example = identifier.call
            self.dtype = identifier.dtype or "float32"
        elif callable(identifier):
            # Keras wraps loss functions with its default reduction; so does kmtl.
            reduction = "sum_over_batch_size"
            self.per_example = identifier
            self.dtype = "float32"
        else:
            raise ValueError(
                f"The loss of head {name!r} must be a keras.losses.Loss, a loss function or its name. "
                f"Received: {identifier!r}"
            )
        self.reduction = reduction
        self.identifier = identifier


def _match_rank(weight, values):
    """Reshapes a per-example weight to broadcast against per-example loss values."""
    while len(weight.shape) > len(values.shape) and weight.shape[-1] == 1:
        weight = ops.squeeze(weight, axis=-1)
    while len(weight.shape) < len(values.shape):
        weight = ops.expand_dims(weight, -1)
    return weight


class TaskObjective:
    """The per-task training objective of a `kmtl.MultiTaskModel`.

    Args:
        heads: the model's heads (in order).
        loss: `{head: loss}` for every head: a `keras.losses.Loss`, a loss
            function or its name, or `None` for a head that is not trained.
        loss_weights: `{head: weight}` static weights (missing heads: 1.0).
            Finite numbers >= 0 (Python or NumPy).
        validate_targets: check label values in the graph (skipped under
            XLA, where in-graph assertions do not compile).

    Raises:
        ValueError: for non-finite or negative weights, losses that do not
            reduce to a scalar, or every head without a loss.
    """

    def __init__(
        self,
        heads: Sequence,
        loss: Mapping,
        loss_weights: Mapping | None = None,
        validate_targets: bool = True,
    ):
        self.heads = list(heads)
        self.head_map = {h.name: h for h in self.heads}
        self.loss_identifiers = {h.name: loss.get(h.name) for h in self.heads}
        self.task_names = [h.name for h in self.heads if self.loss_identifiers[h.name] is not None]
        if not self.task_names:
            raise ValueError("Every head has loss None: nothing to train.")
        self._losses = {n: _TaskLoss(n, self.loss_identifiers[n]) for n in self.task_names}
        weights = dict(loss_weights or {})
        self.static_weights = [_check_weight(n, weights.get(n, 1.0)) for n in self.task_names]
        self.validate_targets = bool(validate_targets)
        # `loss`: the static-weighted sum of the task means (and the mean regularization).
        self.total_tracker = TaskTotal(
            [logs.key(n, "loss") for n in self.task_names] + ["regularization"],
            self.static_weights + [1.0],
            name="loss",
        )
        # One tracker per quantity for all tasks (not one per task): a step's
        # bookkeeping does not grow by a metric update per head.
        self.loss_tracker = TaskMeans([logs.key(n, "loss") for n in self.task_names], name="task_losses")
        self.weight_tracker = TaskMeans([logs.key(n, "weight") for n in self.task_names], name="task_weights")
        # What made a training step fail in this fit: [kind, task index] (see
        # kmtl.backend.tensorflow.step); [0, -1] while every step succeeded.
        self.status = keras.Variable(
            [0, -1], dtype="int32", trainable=False, aggregation="only_first_replica", name="step_status"
        )

    def reset_status(self) -> None:
        """Forgets an earlier failure (called when a `fit` begins)."""
        self.status.assign([0, -1])

    def failure(self):
        """`None`, or `(kind, task name or None)` of the first failed step of this fit."""
        kind, task = (int(v) for v in keras.ops.convert_to_numpy(self.status))
        if kind == 0:
            return None
        return kind, (self.task_names[task] if 0 <= task < len(self.task_names) else None)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    # --- targets -----------------------------------------------------------
    def prepare(self, y, sample_weight, check_values: bool = True):
        """Standardises and checks one batch's targets.

        Returns `(targets, weights)`: dicts keyed by every head that has a
        target (weights: a tensor or `None`). Keys, shapes and dtypes are
        checked at trace time; label values in the graph, ordered before any
        loss (so the message names the head, never a kernel).

        Raises:
            ValueError: for target keys that match no head, trained heads
                without a target, wrong shapes or dtypes.
        """
        names = [h.name for h in self.heads]
        if not isinstance(y, dict):
            if len(names) == 1 and y is not None:
                y = {names[0]: y}
                if sample_weight is not None and not isinstance(sample_weight, dict):
                    sample_weight = {names[0]: sample_weight}
            else:
                raise ValueError(
                    f"Targets must be a dict keyed by head name {names}. "
                    f"Received: targets of type {type(y).__name__}"
                )
        unknown = sorted(set(y) - set(names))
        if unknown:
            raise ValueError(
                f"Target key(s) {unknown} match no head. Heads: {names}. Received target keys: {sorted(y)}"
            )
        missing = [n for n in self.task_names if n not in y]
        if missing:
            raise ValueError(
                f"Head(s) {missing} have no target in the data. Received target keys: "
                f"{sorted(y)}. Give every head a target (with a sample weight of 0 "
                "where its label is missing), or compile with loss={name: None} "
                "for heads you do not train."
            )
        if isinstance(sample_weight, dict):
            unknown = sorted(set(sample_weight) - set(names))
            if unknown:
                raise ValueError(f"Sample-weight key(s) {unknown} match no head. Heads: {names}.")
        targets, weights = {}, {}
        for name, target in y.items():
            head = self.head_map[name]
            target = ops.convert_to_tensor(target)
            head.check_target_spec(tuple(target.shape), target.dtype)
            weight = sample_weight.get(name) if isinstance(sample_weight, dict) else sample_weight
            if weight is not None:
                weight = ops.cast(ops.convert_to_tensor(weight), "float32")
            bounds = head.label_range()
            if bounds is not None:
                low, high, integer = bounds
                if weight is not None:
                    # Missing labels may hold placeholders (e.g. -1): give them a valid value.
                    mask = ops.reshape(ops.reshape(weight, (-1,)) > 0, (-1,) + (1,) * (len(target.shape) - 1))
                    target = ops.where(mask, target, ops.cast(low, target.dtype))
                if check_values and self.validate_targets:
                    kind = "integers" if integer else "values"
                    message = f"Head {name!r}: labels must be {kind} in [{low}, {high}]."
                    target = backend.check_label_range(target, low, high, integer, message)
            targets[name], weights[name] = target, weight
        return targets, weights

    # --- losses ------------------------------------------------------------
    def task_losses(self, targets, y_pred, weights, regularization=()) -> TaskLosses:
        """The per-task losses of one batch (one collective under `tf.distribute`).

        Args:
            targets, weights: from `prepare`.
            y_pred: `{head: prediction}`.
            regularization: the model's added losses (`model.losses`).
        """
        local_sums, denominators, counts, sizes = [], [], [], []
        replicas = backend.num_replicas()
        for name in self.task_names:
            task_loss = self._losses[name]
            prediction = y_pred[name]
            target = ops.convert_to_tensor(targets[name], dtype=task_loss.dtype)
            prediction = ops.convert_to_tensor(prediction, dtype=task_loss.dtype)
            values = ops.cast(task_loss.per_example(target, prediction), "float32")
            size = ops.cast(ops.size(values), "float32")
            weight = weights.get(name)
            if weight is None:
                local_sums.append(ops.sum(values))
                count = ops.cast(ops.shape(values)[0] if len(values.shape) else 1, "float32")
                weight_total = size
            else:
                weight = _match_rank(weight, values)
                local_sums.append(ops.sum(values * weight))
                count = ops.sum(ops.cast(weight > 0, "float32"))
                weight_total = ops.sum(weight)
            if task_loss.reduction == "mean_with_sample_weight":
                denominators.append(weight_total)
            elif task_loss.reduction == "sum":
                denominators.append(ops.convert_to_tensor(1.0 / replicas, "float32"))
            else:
                denominators.append(size)
            counts.append(count)
            sizes.append(weight_total if task_loss.reduction == "mean_with_sample_weight" else size)
        local = ops.stack(local_sums)
        stats = ops.stack(
            [ops.stop_gradient(local), ops.stack(denominators), ops.stack(counts), ops.stack(sizes)]
        )
        total_sum, total_denominator, total_count, total_size = ops.unstack(
            backend.sum_over_replicas(stats), axis=0
        )
        safe = ops.where(total_denominator > 0, total_denominator, ops.ones_like(total_denominator))
        static = ops.convert_to_tensor(self.static_weights, "float32")
        raw_values = total_sum / safe
        shares = local / ops.stop_gradient(safe) * static
        values = raw_values * static
        reg_share = reg_value = None
        extra = [ops.sum(ops.cast(loss, "float32")) for loss in regularization]
        if extra:
            reg_value = ops.sum(ops.stack(extra))
            reg_share = reg_value / replicas
        return TaskLosses(
            shares=shares,
            values=ops.stop_gradient(values),
            raw_values=ops.stop_gradient(raw_values),
            present=total_count > 0,
            finite=ops.isfinite(values),
            regularization_share=reg_share,
            regularization_value=None if reg_value is None else ops.stop_gradient(reg_value),
            mean_weights=total_size,
        )

    # --- trackers ----------------------------------------------------------
    def metrics(self, training: bool) -> list:
        """The trackers this objective reports (`loss`, `<task>_loss`, in training `<task>_weight`)."""
        trackers = [self.total_tracker, self.loss_tracker]
        if training:
            trackers.append(self.weight_tracker)
        return trackers

    def update_trackers(self, losses: TaskLosses, batch_size, task_weights=None, accept=None):
        """Records one batch (nothing where `accept` is False)."""
        batch = ops.cast(batch_size, "float32")
        if accept is not None:
            batch = ops.where(accept, batch, ops.zeros_like(batch))

        def clean(value):
            return value if accept is None else ops.where(accept, value, ops.zeros_like(value))

        weights = ops.cast(losses.mean_weights, "float32")
        if accept is not None:
            weights = ops.where(accept, weights, ops.zeros_like(weights))
        regularization = losses.regularization_value
        regularization = ops.zeros((1,)) if regularization is None else ops.reshape(regularization, (1,))
        self.total_tracker.update_state(
            ops.concatenate([clean(losses.raw_values), clean(regularization)]),
            sample_weight=ops.concatenate([weights, ops.reshape(batch, (1,))]),
        )
        self.loss_tracker.update_state(clean(losses.raw_values), sample_weight=weights)
        if task_weights is not None:
            self.weight_tracker.update_state(clean(task_weights), sample_weight=batch)

    # --- config ------------------------------------------------------------
    def loss_config(self) -> dict:
        """`{head: loss identifier}` as given to compile (for the compile config)."""
        return dict(self.loss_identifiers)


__all__ = ["TaskLosses", "TaskMeans", "TaskObjective", "TaskTotal"]
