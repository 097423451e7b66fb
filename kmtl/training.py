"""The TensorFlow training step of `MultiTaskModel` (the one place for TF glue).

Three paths, all following Keras's own TF `train_step` (unpack, forward,
loss tracker, `optimizer.scale_loss`, apply, `compute_metrics`):

* static weights (no strategy) and loss-level strategies: one forward, the
  per-task losses, one scalar, one backward;
* gradient-level strategies in ``"parameters"`` mode: per-task gradients of
  the shared variables (one vectorised backward pass, `tape.jacobian` with
  pfor, from a single forward pass),
  summed over replicas, combined by the strategy; each task's decoder gets
  its own task's gradient;
* gradient-level strategies in ``"representation"`` mode: per-task gradients
  of the shared representation (backward through the decoders only), their
  Gram matrix summed over replicas, combined, then a single backward pass
  through the encoder.

With `update_every=k` the per-task gradients are computed every k-th step;
the steps in between reuse the last task weights with one ordinary backward
pass. A batch whose task losses are not all finite applies zero gradients
(the `TrainingGuard` callback then stops training and names the task).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import tree


def _num_replicas() -> int:
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def _sum_over_replicas(values):
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _zeros_for_none(grads, variables):
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]


def _guard(grads, finite, after=()):
    """Zeroes all gradients of a non-finite batch.

    `after`: outputs of collectives launched in this step. Making the
    gradients depend on them orders those collectives before the optimizer's
    all-reduce on every replica (unordered collectives can mismatch).
    """
    with tf.control_dependencies(list(after)):
        return [tf.where(finite, g, tf.zeros_like(g)) for g in grads]


def _batch_size(x):
    return tf.shape(next(i for i in tree.flatten(x) if i is not None))[0]


def train_step(model, data):
    """One training step of a `kmtl.MultiTaskModel` (see the module docstring)."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y, sample_weight = model._standardize_targets(y, sample_weight)
    y = model._value_checks(y, sample_weight)
    strategy = model.weighting
    if strategy is not None and strategy.level == "gradient":
        y_pred, weights = _gradient_level(model, strategy, x, y, sample_weight)
    else:
        y_pred, weights = _loss_level(model, strategy, x, y, sample_weight)
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    logs = dict(logs)
    for name, w in weights.items():
        tracker = model._weight_trackers.get(name)
        if tracker is not None:
            tracker.update_state(w)
            logs[tracker.name] = tracker.result()
    return logs


def _track_total(model, x, losses, static, reg):
    """Updates the `loss` tracker with the static-weighted sum, as `evaluate` reports it."""
    total = tf.reduce_sum(losses * static)
    if reg is not None:
        total = total + reg
    model._loss_tracker.update_state(
        keras.src.losses.loss.unscale_loss_for_distribution(total), sample_weight=_batch_size(x)
    )
    return total


def _loss_level(model, strategy, x, y, sample_weight):
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        names, losses, static, present = model.task_losses(y, y_pred, sample_weight)
        reg = model._regularization_loss()
        total = _track_total(model, x, losses, static, reg)
        if strategy is not None:
            replicas = _num_replicas()
            strategy.pop_collective_outputs()
            # "Present" means labelled somewhere in the global batch.
            present = _sum_over_replicas(tf.cast(present, "float32")) > 0
            objective = strategy.combine(losses * static * replicas, present, model.optimizer.iterations)
            total = objective / replicas
            if reg is not None:
                total = total + reg
            weights = {n: strategy.task_weights[i] for i, n in enumerate(names)}
        else:
            weights = {n: static[i] for i, n in enumerate(names)}
        total = model.optimizer.scale_loss(total)
    grads = tape.gradient(total, variables)
    finite = tf.reduce_all(tf.math.is_finite(losses))
    after = strategy.pop_collective_outputs() if strategy is not None else []
    grads = _guard(_zeros_for_none(grads, variables), finite, after)
    model.optimizer.apply(grads, variables)
    return y_pred, weights


def _split_variables(model, names):
    shared = model.shared_variables
    task = model.task_variables
    owned = {id(v) for v in shared}
    for n in names:
        owned.update(id(v) for v in task[n])
    # Variables of decoders whose head has no loss, or of the strategy itself.
    rest = [v for v in model.trainable_variables if id(v) not in owned]
    return shared, [task[n] for n in names], rest


def _gradient_level(model, strategy, x, y, sample_weight):
    representation_mode = strategy.mode == "representation"
    with tf.GradientTape(persistent=True) as tape:
        if representation_mode:
            rep = model.encoder(x, training=True)
            flat_rep = tree.flatten(rep)
            y_pred = {n: d(rep, training=True) for n, d in model.decoders.items()}
        else:
            y_pred = model(x, training=True)
        names, losses, static, present = model.task_losses(y, y_pred, sample_weight)
        reg = model._regularization_loss()
        _track_total(model, x, losses, static, reg)
        weighted = losses * static
        scaled = [model.optimizer.scale_loss(weighted[i]) for i in range(len(names))]
        scaled_vector = tf.stack(scaled)
        if reg is not None:
            reg = model.optimizer.scale_loss(reg)
    shared, task_vars, rest = _split_variables(model, names)
    step = model.optimizer.iterations
    replicas = _num_replicas()
    strategy.pop_collective_outputs()
    # One collective for the mask and the losses, ordered before the gradients'.
    summed = _sum_over_replicas(tf.concat([tf.cast(present, "float32"), tf.stop_gradient(weighted)], 0))
    num_tasks = len(names)
    present = summed[:num_tasks] > 0
    synced_losses = summed[num_tasks:]

    def per_task_gradients():
        sources = flat_rep if representation_mode else shared
        if not representation_mode:
            # One vectorised (pfor) backward pass for all tasks. On MultiLeNet at
            # 2 tasks: 1.1-1.4x an equal-weight step, against 3.5x for a loop of
            # tape.gradient calls; at 10 tasks pfor and the loop cost 5.3x and
            # 5.9x one backward pass (benchmarks/README.md, Weighting).
            jac = tape.jacobian(scaled_vector, list(sources), experimental_use_pfor=True)
            stacked = _zeros_for_none(jac, [tf.zeros((len(names),) + tuple(v.shape)) for v in sources])
            heads = [
                _zeros_for_none(tape.gradient(scaled[i], task_vars[i]), task_vars[i])
                for i in range(len(names))
            ]
            return stacked, heads
        stacked, heads = [], []
        for i in range(len(names)):
            grads = tape.gradient(scaled[i], list(sources) + task_vars[i])
            grads = _zeros_for_none(grads, list(sources) + task_vars[i])
            stacked.append(grads[: len(sources)])
            heads.append(grads[len(sources) :])
        stacked = [tf.stack(parts) for parts in zip(*stacked)]
        return stacked, heads

    def combine_full():
        stacked, heads = per_task_gradients()
        if representation_mode:
            if strategy.gram_based:
                num = len(names)
                gram = tf.add_n(
                    [
                        tf.matmul(tf.reshape(g, (num, -1)), tf.reshape(g, (num, -1)), transpose_b=True)
                        for g in stacked
                    ]
                )
                with tf.control_dependencies([summed]):
                    gram = _sum_over_replicas(gram)
                alpha = strategy.weights_from_gram(gram, synced_losses, present, step)
                strategy.task_weights.assign(tf.cast(alpha, strategy.task_weights.dtype))
                combined = [tf.tensordot(tf.cast(alpha, g.dtype), g, axes=1) for g in stacked]
            else:
                combined = strategy.combine_gradients(stacked, synced_losses, present, step)
            shared_grads = tape.gradient(flat_rep, shared, output_gradients=combined)
            shared_grads = _zeros_for_none(shared_grads, shared)
        else:
            with tf.control_dependencies([summed]):
                stacked = _sum_over_replicas(stacked)
            combined = strategy.combine_gradients(stacked, synced_losses, present, step)
            # The optimizer sums over replicas again: hand it a per-replica share.
            shared_grads = [g / replicas for g in combined]
        return shared_grads + [g for parts in heads for g in parts]

    def reuse_weights():
        alpha = tf.cast(strategy.task_weights, scaled[0].dtype)
        weights = [alpha[i] for i in range(len(names))]
        shared_grads = _zeros_for_none(tape.gradient(scaled, shared, output_gradients=weights), shared)
        head_vars = [v for vs in task_vars for v in vs]
        head_grads = _zeros_for_none(tape.gradient(scaled, head_vars), head_vars)
        return shared_grads + head_grads

    if strategy.update_every == 1:
        grads = combine_full()
    else:
        grads = tf.cond(tf.equal(step % strategy.update_every, 0), combine_full, reuse_weights)
    variables = shared + [v for vs in task_vars for v in vs]
    if rest:
        rest_grads = _zeros_for_none(tape.gradient(scaled, rest), rest)
        grads, variables = grads + rest_grads, variables + rest
    if reg is not None:
        reg_grads = _zeros_for_none(tape.gradient(reg, variables), variables)
        grads = [g + r for g, r in zip(grads, reg_grads)]
    finite = tf.reduce_all(tf.math.is_finite(losses))
    after = [summed] + strategy.pop_collective_outputs()
    model.optimizer.apply(_guard(grads, finite, after), variables)
    weights = {n: strategy.task_weights[i] for i, n in enumerate(names)}
    return y_pred, weights
