"""The train and test steps of `kmtl.MultiTaskModel`, as functions of public objects.

A step reads the model (its graph: `encoder`, `decoders`, `encoder_stages`,
`shared_variables`, `task_variables`), its objective (`model.objective`), its
weighting strategy (`model.weighting`) and its optimizer, and nothing else.

Paths:

* **Loss level** (static weights or a loss-level strategy): one forward pass,
  the per-task losses, one scalar, one backward pass.
* **Gradient level**: one forward pass through the encoder and the decoders;
  each task's gradient with respect to the shared representation and its own
  head (one pass through that task's decoder); then

  - ``mode="representation"``: the strategy combines the representation
    gradients (their Gram matrix, summed over replicas, for Gram-based
    strategies), and one backward pass through the encoder applies the
    combination;
  - ``mode="parameters"``, Jacobian engine: the per-task gradients of every
    shared variable at once (one vectorised backward pass of the encoder from
    the representation gradients), summed over replicas and combined;
  - ``mode="parameters"``, Gram engine (Gram-based strategies on chain
    encoders): see `kmtl.backend.tensorflow.gram`.

  With `update_every=k` the weights are recomputed every k-th step; the steps
  in between reuse the last ones with one backward pass of the encoder.

**A failure changes nothing.** The step checks the finiteness of everything
it would apply: every task's loss, every per-task gradient before a solver
sees it (a non-finite one is replaced by a harmless value for the solver, so
that no solver raises), the task weights, and the gradients handed to the
optimizer (over all replicas). If anything is not finite the optimizer is not
called at all (weights, slots and `iterations` unchanged), the strategy's new
state is not committed, the trackers do not record the batch, and the
objective's `status` records what failed so that `kmtl.TrainingGuard` stops
training with `kmtl.NonFiniteLossError`. Once a batch failed, the following
steps of the same `fit` change nothing either.

**Mixed precision and loss scaling** (`kmtl.backend.tensorflow.scaling`).
Every loss is scaled by the optimizer's `scale_loss` before its gradient is
taken; every gradient is then unscaled and cast to float32 before anything
reads it, so strategies combine the true per-task gradients in float32 (the
representation gradients too, cast back to the representation's dtype and
scaled again for the backward passes through the encoder), and the final
update is scaled back for the optimizer, which unscales it. Under a
`keras.optimizers.LossScaleOptimizer` (what `compile` uses under
`"mixed_float16"`), a step whose losses are finite but whose gradients
overflow while the scale is above 1 is not a failure: it is a skipped step.
The optimizer receives NaN gradients, so it changes neither the weights nor
its inner optimizer's slots and `iterations` and halves its scale; the
strategy's state is not committed and the trackers do not record the batch.
Non-finite losses (NaN data, a float16 forward pass out of range) and
non-finite gradients at a scale of 1 or less stay failures.
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf
from keras import tree

from kmtl.backend.tensorflow import checks, distribute, gram
from kmtl.backend.tensorflow.scaling import LossScale
from kmtl.weighting.base import combine_with, gram_matrix

#: Codes of `objective.status[0]`: what made a step fail.
OK, BAD_LOSS, BAD_TASK_GRADIENT, BAD_UPDATE = 0, 1, 2, 3


def _batch_size(x):
    return tf.shape(next(t for t in tree.flatten(x) if t is not None))[0]


def _zeros_for_none(grads, variables):
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]


def _all_finite(tensors):
    flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


def _per_task_finite(stacked):
    """`[T]` bool: whether every entry of task t is finite in a list of `[T, ...]` tensors."""
    flags = [tf.reduce_all(tf.reshape(tf.math.is_finite(g), (tf.shape(g)[0], -1)), axis=1) for g in stacked]
    return tf.reduce_all(tf.stack(flags), axis=0)


def _first(flags):
    """Index of the first False in a `[T]` bool vector (-1 if none)."""
    bad = tf.logical_not(flags)
    return tf.where(tf.reduce_any(bad), tf.cast(tf.argmax(tf.cast(bad, tf.int32)), tf.int32), -1)


class _Verdict:
    """Collects failures in order of precedence: the first one recorded is reported."""

    def __init__(self):
        self.kind = tf.constant(OK, tf.int32)
        self.task = tf.constant(-1, tf.int32)

    def require(self, flags, kind):
        """`flags`: `[T]` per-task or scalar bool; False means failure of `kind`."""
        flags = tf.convert_to_tensor(flags)
        if flags.shape.rank == 0:
            failed, task = tf.logical_not(flags), tf.constant(-1, tf.int32)
        else:
            failed, task = tf.logical_not(tf.reduce_all(flags)), _first(flags)
        fresh = tf.logical_and(failed, tf.equal(self.kind, OK))
        self.kind = tf.where(fresh, tf.constant(kind, tf.int32), self.kind)
        self.task = tf.where(fresh, task, self.task)

    def accepted(self, status):
        """True if nothing failed in this step nor earlier in this `fit`."""
        return tf.logical_and(tf.equal(self.kind, OK), tf.equal(status[0], OK))

    def record(self, status, accept):
        """Stores the first failure of this `fit` in the status variable."""
        first_failure = tf.logical_and(tf.logical_not(accept), tf.equal(status[0], OK))
        status.assign(tf.where(first_failure, tf.stack([self.kind, self.task]), status))


def train_step(model, data):
    """One training step of a `kmtl.MultiTaskModel` (see the module docstring)."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    objective = model.objective
    targets, weights = objective.prepare(y, sample_weight)
    strategy = model.weighting
    verdict = _Verdict()
    if strategy is not None and strategy.level == "gradient":
        y_pred, losses, task_weights, commit = _gradient_level(model, strategy, x, targets, weights, verdict)
    else:
        y_pred, losses, task_weights, commit = _loss_level(model, strategy, x, targets, weights, verdict)
    accept = verdict.accepted(objective.status)
    # An overflow step is accepted (no failure) but updates nothing except the loss scale.
    update = commit(accept)
    verdict.record(objective.status, accept)
    if strategy is not None and getattr(strategy, "needs_losses_after_step", False):
        _after_step(model, strategy, x, targets, weights, losses, update)
    objective.update_trackers(losses, _batch_size(x), task_weights, update)
    logs = dict(
        model.compute_metrics(x, targets, y_pred, sample_weight=_metric_weights(model, sample_weight))
    )
    logs.update(objective.weight_tracker.result())
    return logs


def test_step(model, data):
    """One evaluation step: the objective's losses and trackers, then Keras's metrics."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    objective = model.objective
    targets, weights = objective.prepare(y, sample_weight)
    y_pred = model(x, training=False)
    losses = objective.task_losses(targets, y_pred, weights, model.losses)
    objective.update_trackers(losses, _batch_size(x))
    return model.compute_metrics(x, targets, y_pred, sample_weight=_metric_weights(model, sample_weight))


def _metric_weights(model, sample_weight):
    if sample_weight is not None and not isinstance(sample_weight, dict) and len(model.heads) == 1:
        return {model.heads[0].name: sample_weight}
    return sample_weight


def _solver_inputs(losses):
    """`(values, present)` safe for a strategy: a non-finite task is absent, its value 0.

    Such a batch is rejected anyway; this only keeps solvers from failing on it.
    """
    finite = losses.finite
    values = tf.where(finite, losses.values, tf.zeros_like(losses.values))
    return values, tf.logical_and(losses.present, finite)


def _check_losses(losses, verdict):
    """Requires finite losses; returns the scalar "all losses finite"."""
    verdict.require(losses.finite, BAD_LOSS)
    finite = tf.reduce_all(losses.finite)
    if losses.regularization_value is not None:
        regularization_finite = tf.math.is_finite(losses.regularization_value)
        verdict.require(regularization_finite, BAD_LOSS)
        finite = tf.logical_and(finite, regularization_finite)
    return distribute.all_true(finite)


def _commit(accept, overflow, optimizer, grads, variables, strategy, new_state, scale):
    """Applies the update and the strategy's state if `accept`; returns "the step updated".

    On an overflow step the optimizer still gets the (NaN) gradients: a
    `LossScaleOptimizer` then skips the update and lowers its scale.
    """
    distribute.apply_if(accept, optimizer, scale.for_optimizer(grads, variables, overflow), variables)
    update = tf.logical_and(accept, tf.logical_not(overflow))
    if strategy is not None:
        strategy.commit(new_state, update)
    return update


# --- loss level ------------------------------------------------------------------
def _loss_level(model, strategy, x, targets, weights, verdict):
    objective = model.objective
    optimizer = model.optimizer
    variables = model.trainable_variables
    replicas = distribute.num_replicas()
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        losses = objective.task_losses(targets, y_pred, weights, model.losses)
        if strategy is None:
            task_weights = tf.constant(objective.static_weights, tf.float32)
            total = tf.reduce_sum(losses.shares)
            new_state = {}
        else:
            # The strategy sees this replica's estimate of the global losses and
            # returns the total for it; the replicas' gradients are summed.
            values, present = _solver_inputs(losses)
            total, task_weights, new_state = strategy.combine(
                losses.shares * replicas, values, present, optimizer.iterations, strategy.state()
            )
            total = total / replicas
        if losses.regularization_share is not None:
            total = total + losses.regularization_share
        scaled = optimizer.scale_loss(total)
    scale = LossScale(optimizer)
    grads = [scale.unscale(g) for g in _zeros_for_none(tape.gradient(scaled, variables), variables)]
    losses_finite = _check_losses(losses, verdict)
    grads_finite = distribute.all_true(_all_finite(grads))
    overflow = scale.overflow(losses_finite, grads_finite)
    verdict.require(_all_finite([task_weights]), BAD_UPDATE)
    verdict.require(tf.logical_or(grads_finite, overflow), BAD_UPDATE)

    def commit(accept):
        state = {**new_state, "task_weights": task_weights}
        return _commit(accept, overflow, optimizer, grads, variables, strategy, state, scale)

    return y_pred, losses, task_weights, commit


# --- gradient level --------------------------------------------------------------
def _split_variables(model, task_names):
    shared = model.shared_variables
    owned = {id(v) for v in shared}
    heads = {}
    for name in task_names:
        heads[name] = list(model.task_variables[name])
        owned.update(id(v) for v in heads[name])
    # Decoders of heads without a loss: no gradient.
    rest = [v for v in model.trainable_variables if id(v) not in owned]
    return shared, heads, rest


def use_gram_engine(model, strategy) -> bool:
    """Whether the parameters-mode step of `strategy` on `model` runs on the Gram engine."""
    if strategy.level != "gradient" or strategy.mode != "parameters" or not strategy.gram_based:
        return False
    if strategy.engine == "jacobian":
        return False
    applicable = gram.applicable(model)
    if strategy.engine == "gram":
        if not applicable:
            raise ValueError(
                f"engine='gram' needs an encoder that is a chain of stages (architecture 'hard_sharing'); "
                f"architecture {model.architecture!r} is not. Use engine='jacobian' or 'auto'. "
                f"Received: {type(strategy).__name__}(engine='gram')"
            )
        return True
    return applicable and gram.prefer(model, len(model.objective.task_names))


def _sanitize_gram(matrix):
    """`(finite matrix for the solver, [T] per-task finiteness)` of a Gram matrix."""
    flags = tf.reduce_all(tf.math.is_finite(matrix), axis=1)
    clean = tf.where(tf.reduce_all(flags), matrix, tf.eye(tf.shape(matrix)[0], dtype=matrix.dtype))
    return clean, flags


def _sanitize_stacked(stacked):
    """`(per-task gradients with a non-finite task's rows zeroed, [T] per-task finiteness)`."""
    flags = _per_task_finite(stacked)
    cleaned = []
    for g in stacked:
        mask = tf.reshape(flags, (-1,) + (1,) * (g.shape.rank - 1))
        cleaned.append(tf.where(mask, g, tf.zeros_like(g)))
    return cleaned, flags


def _gradient_level(model, strategy, x, targets, weights, verdict):
    objective = model.objective
    optimizer = model.optimizer
    names = objective.task_names
    num_tasks = len(names)
    replicas = distribute.num_replicas()
    on_gram_engine = use_gram_engine(model, strategy)
    with tf.GradientTape(persistent=True) as tape:
        if on_gram_engine:
            hidden = gram.forward_stages(model, x)
            representation = hidden[-1]
        else:
            representation = model.encoder(x, training=True)
        y_pred = {h.name: model.decoders[h.name](representation, training=True) for h in model.heads}
        losses = objective.task_losses(targets, y_pred, weights, model.losses)
        scaled = [optimizer.scale_loss(losses.shares[i]) for i in range(num_tasks)]
        reg = None
        if losses.regularization_share is not None:
            reg = optimizer.scale_loss(losses.regularization_share)
    flat_rep = tree.flatten(representation)
    shared, heads, rest = _split_variables(model, names)
    step = optimizer.iterations
    scale = LossScale(optimizer)

    # Each task's gradient of the representation and of its own head: one pass
    # through that task's decoder (none through the other decoders).
    rep_grads, head_grads = [], []
    for i, name in enumerate(names):
        sources = flat_rep + heads[name]
        grads = _zeros_for_none(tape.gradient(scaled[i], sources), sources)
        rep_grads.append(grads[: len(flat_rep)])
        head_grads.extend(scale.unscale(g) for g in grads[len(flat_rep) :])
    # Per flat tensor, [T, B, ...]: as taken (scaled, in the representation's
    # dtype) for backward passes, and unscaled in float32 for the strategy.
    rep_cotangents = [tf.stack(parts) for parts in zip(*rep_grads)]
    rep_grads = [scale.unscale(g) for g in rep_cotangents]

    state = strategy.state()
    values, present = _solver_inputs(losses)

    def encoder_backward(rep_combination):
        cotangents = [scale.cotangent(c, r.dtype) for c, r in zip(rep_combination, flat_rep)]
        grads = tape.gradient(flat_rep, shared, output_gradients=cotangents)
        return [scale.unscale(g) for g in _zeros_for_none(grads, shared)]

    def full():
        if strategy.mode == "representation":
            if strategy.gram_based:
                matrix, flags = _sanitize_gram(distribute.sum_over_replicas(gram_matrix(rep_grads)))
                alpha, new_state = strategy.weights_from_gram(matrix, values, present, step, state)
                combination = combine_with(alpha, rep_grads)
            else:
                clean, flags = _sanitize_stacked(rep_grads)
                combination, alpha, new_state = strategy.combine_gradients(
                    clean, values, present, step, state
                )
            shared_grads = encoder_backward(combination)
        elif on_gram_engine:
            matrix = gram.stagewise_gram(tape, model, hidden, rep_cotangents, scale.unscale)
            matrix, flags = _sanitize_gram(matrix)
            alpha, new_state = strategy.weights_from_gram(matrix, values, present, step, state)
            shared_grads = encoder_backward(combine_with(alpha, rep_grads))
        else:
            stacked = gram.per_task_parameter_gradients(tape, flat_rep, shared, rep_cotangents)
            stacked = [scale.unscale(g) for g in stacked]
            clean, flags = _sanitize_stacked(distribute.sum_over_replicas(stacked))
            combined, alpha, new_state = strategy.combine_gradients(clean, values, present, step, state)
            # The optimizer sums over replicas again: hand it a per-replica share.
            shared_grads = [g / replicas for g in combined]
        alpha = tf.cast(alpha, tf.float32)
        return shared_grads, alpha, {**state, **new_state}, flags

    def reuse():
        alpha = tf.cast(strategy.task_weights, tf.float32)
        return (
            encoder_backward(combine_with(alpha, rep_grads)),
            alpha,
            dict(state),
            tf.ones((num_tasks,), tf.bool),
        )

    if strategy.update_every == 1:
        shared_grads, alpha, new_state, task_flags = full()
    elif replicas == 1:
        shared_grads, alpha, new_state, task_flags = tf.cond(
            tf.equal(step % strategy.update_every, 0), full, reuse
        )
    else:
        # A conditional in replica context cannot hold the cross-replica sums of
        # `full`: both run and the update step picks. Same result, no saving.
        recompute = tf.equal(step % strategy.update_every, 0)
        chosen = tree.map_structure(lambda a, b: tf.where(recompute, a, b), full(), reuse())
        shared_grads, alpha, new_state, task_flags = chosen
    variables = shared + [v for name in names for v in heads[name]]
    grads = shared_grads + head_grads
    if rest:
        variables = variables + rest
        grads = grads + [tf.zeros_like(v) for v in rest]
    if reg is not None:
        reg_grads = _zeros_for_none(tape.gradient(reg, variables), variables)
        grads = [g + scale.unscale(r) for g, r in zip(grads, reg_grads)]
    losses_finite = _check_losses(losses, verdict)
    grads_finite = distribute.all_true(tf.logical_and(tf.reduce_all(task_flags), _all_finite(grads)))
    overflow = scale.overflow(losses_finite, grads_finite)
    verdict.require(tf.logical_or(task_flags, overflow), BAD_TASK_GRADIENT)
    verdict.require(tf.logical_or(_all_finite([alpha]), overflow), BAD_UPDATE)
    verdict.require(tf.logical_or(grads_finite, overflow), BAD_UPDATE)

    def commit(accept):
        state = {**new_state, "task_weights": alpha}
        return _commit(accept, overflow, optimizer, grads, variables, strategy, state, scale)

    return y_pred, losses, alpha, commit


def _after_step(model, strategy, x, targets, weights, losses, accept):
    """Strategies that learn from the same batch after the update (FAMO's authors' form).

    One more forward pass with the updated weights, in training mode as in the
    authors' code (so dropout is active and batch-norm statistics update once
    more), then the strategy's `after_step`, committed if the batch was accepted.
    """
    y_pred = model(x, training=True)
    after = model.objective.task_losses(targets, y_pred, weights)
    new_state = strategy.after_step(
        losses.values, after.values, losses.present, model.optimizer.iterations, strategy.state()
    )
    accept = tf.logical_and(accept, tf.reduce_all(after.finite))
    strategy.commit(new_state, accept)


#: One traced probe per model (and per objective: a new `compile` traces again).
_PROBES = weakref.WeakKeyDictionary()


def shared_task_gradients(model, data):
    """`[T, P]`: each task's gradient of the shared variables on one batch (inference mode).

    The same per-task gradients as the parameters-mode step (representation
    gradients, then one vectorised backward pass of the encoder); no variable,
    tracker or state changes. Traced once per model and compile (batches of
    other shapes share the trace where they can), so diagnostics that call it
    every epoch do not build the vectorised backward pass again each time.
    """
    objective, probe = _PROBES.get(model, (None, None))
    if objective is not model.objective:
        reference = weakref.ref(model)
        probe = tf.function(lambda batch: _shared_task_gradients(reference(), batch), reduce_retracing=True)
        _PROBES[model] = (model.objective, probe)
    with checks.translate_errors(model):
        return probe(data)


def _shared_task_gradients(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    objective = model.objective
    targets, weights = objective.prepare(y, sample_weight)
    names = objective.task_names
    with tf.GradientTape(persistent=True) as tape:
        representation = model.encoder(x, training=False)
        y_pred = {h.name: model.decoders[h.name](representation, training=False) for h in model.heads}
        losses = objective.task_losses(targets, y_pred, weights)
        per_task = [losses.shares[i] for i in range(len(names))]
    flat_rep = tree.flatten(representation)
    rep_grads = [
        tf.stack(parts)
        for parts in zip(*[_zeros_for_none(tape.gradient(loss, flat_rep), flat_rep) for loss in per_task])
    ]
    shared = model.shared_variables
    stacked = distribute.sum_over_replicas(
        gram.per_task_parameter_gradients(tape, flat_rep, shared, rep_grads)
    )
    del tape
    return tf.concat([tf.reshape(g, (len(names), -1)) for g in stacked], axis=1)


__all__ = [
    "BAD_LOSS",
    "BAD_TASK_GRADIENT",
    "BAD_UPDATE",
    "OK",
    "shared_task_gradients",
    "test_step",
    "train_step",
    "use_gram_engine",
]
