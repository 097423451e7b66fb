"""Per-task gradients of the shared parameters: the Jacobian path and the Gram engine.

Both start from each task's gradient with respect to the shared
representation, `R_t = d L_t / d h` (one pass through task t's decoder).

* **Jacobian** (`per_task_parameter_gradients`): one vectorised backward pass
  of the encoder from the `T` representation gradients gives every task's
  gradient of every shared variable at once: `T x P` floats (P = number of
  shared parameters), which the strategy combines. Every strategy can use it.

* **Gram engine** (`stagewise_gram`), for Gram-based strategies on an encoder
  that is a chain of stages `h_s = f_s(h_{s-1})` (kmtl's hard-sharing trunks):
  walking the chain backwards, a vectorised backward pass through stage s
  alone turns the `T` gradients of `h_s` into the `T` gradients of stage s's
  variables and of `h_{s-1}`. The variables' part adds its `T x T` Gram
  contribution and is discarded at once; only the gradients of `h_{s-1}` go
  on. The strategy then picks `alpha` from the Gram matrix, and one ordinary
  backward pass of the encoder with output gradient `sum_t alpha_t R_t`
  applies the update. Peak extra memory: one stage's per-task variable
  gradients, held twice while TensorFlow's vectorised matmul gradient
  transposes them (about `2 x T x` the largest stage's variables, measured),
  instead of `T x P`. Under
  `tf.distribute` each stage's per-task gradients are summed over replicas
  before their Gram contribution, so the result is exact.

`prefer` says when `engine="auto"` takes the Gram engine: where it applies
and the Jacobian would hold more than `JACOBIAN_LIMIT` floats (see
`benchmarks/README.md`, Gram engine, for the measured time and memory of both).
"""

from __future__ import annotations

import math

import tensorflow as tf

from kmtl.backend.tensorflow import distribute
from kmtl.weighting.base import gram_matrix

#: `engine="auto"` takes the Gram engine once the Jacobian holds more floats than this.
JACOBIAN_LIMIT = 2**24


def applicable(model) -> bool:
    """Whether the model's encoder is a chain of stages holding all the shared variables."""
    stages = getattr(model, "encoder_stages", None)
    if not stages:
        return False
    staged = {id(v) for stage in stages for v in stage.trainable_variables}
    return staged == {id(v) for v in model.shared_variables}


def shared_parameter_count(model) -> int:
    return int(sum(math.prod(v.shape) for v in model.shared_variables))


def prefer(model, num_tasks: int) -> bool:
    """`engine="auto"`: the Gram engine when the Jacobian would exceed `JACOBIAN_LIMIT` floats."""
    return num_tasks * shared_parameter_count(model) > JACOBIAN_LIMIT


def forward_stages(model, x):
    """`[h_0 = x, h_1, ..., h_S]`: the encoder applied stage by stage (on the tape)."""
    hidden = [x]
    for stage in model.encoder_stages:
        hidden.append(stage(hidden[-1], training=True))
    return hidden


def _vjp_per_task(tape, target, sources, cotangents):
    """`[T, *source.shape]` per source: the vector-Jacobian products of `target` for `T` cotangents."""

    def one(cotangent):
        grads = tape.gradient(
            target, sources, output_gradients=cotangent, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return grads

    return tf.vectorized_map(one, cotangents)


def per_task_parameter_gradients(tape, flat_rep, shared, rep_grads):
    """Every task's gradient of every shared variable: a list of `[T, *var.shape]`."""
    return list(_vjp_per_task(tape, flat_rep, shared, rep_grads))


def stagewise_gram(tape, model, hidden, rep_grads, unscale=None):
    """`[T, T]` Gram matrix of the per-task shared gradients, accumulated stage by stage.

    `rep_grads` are the output gradients of the representation as the
    backward pass needs them (under loss scaling: scaled, in the
    representation's dtype); `unscale`, if given, turns each stage's per-task
    variable gradients into the true float32 ones before their Gram
    contribution (see `kmtl.backend.tensorflow.scaling`).
    """
    stages = model.encoder_stages
    (cotangent,) = rep_grads  # a chain has one representation tensor
    total = None
    for s in reversed(range(len(stages))):
        variables = list(stages[s].trainable_variables)
        sources = variables + ([hidden[s]] if s > 0 else [])
        if not sources:
            continue
        # Stage s's pass starts only once the Gram contribution of the stage
        # above is computed, so two stages' per-task gradients are never alive
        # together (without it, TensorFlow may run the passes concurrently).
        with tf.control_dependencies([] if total is None else [total]):
            results = _vjp_per_task(tape, hidden[s + 1], sources, cotangent)
        if variables:
            per_task = list(results[: len(variables)])
            if unscale is not None:
                per_task = [unscale(g) for g in per_task]
            per_task = distribute.sum_over_replicas(per_task)
            part = gram_matrix(per_task)
            total = part if total is None else total + part
        if s > 0:
            cotangent = results[-1]
    if total is None:
        num_tasks = rep_grads[0].shape[0]
        total = tf.zeros((num_tasks, num_tasks), tf.float32)
    return total


__all__ = [
    "JACOBIAN_LIMIT",
    "applicable",
    "forward_stages",
    "per_task_parameter_gradients",
    "prefer",
    "shared_parameter_count",
    "stagewise_gram",
]
