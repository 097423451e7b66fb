"""Distribution helpers: replica counts and sums, and the guarded optimizer update.

Outside `tf.distribute` (or with one replica) every helper is the identity or
a plain call, and no collective is created.
"""

from __future__ import annotations

import tensorflow as tf


def _replica_context():
    """The replica context of a multi-replica step, else None."""
    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas() -> int:
    """Number of replicas of the current step (1 outside `tf.distribute`)."""
    if not tf.distribute.has_strategy():
        return 1
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.distribute.get_strategy().num_replicas_in_sync
    return context.num_replicas_in_sync


def sum_over_replicas(value):
    """Sum of `value` (a tensor or a list of tensors) over replicas; no gradient flows through it."""
    context = _replica_context()
    if context is None:
        return value
    # The gradient of a collective is another collective: keep it off the tape.
    if isinstance(value, (list, tuple)):
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.stop_gradient(v) for v in value])
        return [tf.stop_gradient(v) for v in reduced]
    return tf.stop_gradient(context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(value)))


def all_true(flag):
    """True on every replica iff `flag` is True on every replica."""
    context = _replica_context()
    if context is None:
        return flag
    failures = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(flag), tf.float32))
    return tf.equal(failures, 0.0)


def apply_if(accept, optimizer, grads, variables) -> None:
    """`optimizer.apply(grads, variables)` if `accept`, else nothing at all.

    When `accept` is False the optimizer is not called: its slots, its
    `iterations` and the variables stay as they are (a zero gradient would
    still move Adam's or momentum's moments). `accept` must be the same on
    every replica. Under `tf.distribute` the branch is taken in cross-replica
    context (the optimizer's update uses `merge_call`, which a conditional in
    replica context cannot hold), then the update runs on every replica.
    """
    context = _replica_context() if tf.distribute.has_strategy() else None
    if not tf.distribute.has_strategy():
        tf.cond(accept, lambda: optimizer.apply(grads, variables), lambda: None)
        return
    if context is None:
        context = tf.distribute.get_replica_context()

    def merged(distribution, accept, grads):
        decision = distribution.experimental_local_results(accept)[0]

        def update():
            distribution.run(lambda g: optimizer.apply(g, variables), args=(grads,))

        tf.cond(decision, update, lambda: None)

    context.merge_call(merged, args=(accept, grads))


__all__ = ["all_true", "apply_if", "num_replicas", "sum_over_replicas"]
