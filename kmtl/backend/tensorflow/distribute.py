"""Distribution helpers: replica counts and sums, and the guarded optimizer update.

Outside `tf.distribute` (or with one replica) every helper is the identity or
a plain call, and no collective is created.

kmtl's own sums over replicas (task presence and loss totals, per-task
gradients, Gram matrices, finiteness flags) do not use collective ops under
`MirroredStrategy`: they go through `merge_call` and a cross-device op that
needs no collective keys (`ReductionToOneDevice` on CPUs,
`HierarchicalCopyAllReduce` on GPUs). TensorFlow numbers the collective
instances of every new `MirroredStrategy` from the same start and caches the
shape of the first op that used a number for the life of the process, so a
second strategy whose collectives differ in shape crashes ("Shape mismatch
in the collective instance 100"; tensorflow/tensorflow#62790, #61314). With
kmtl's sums off the collective path, the collectives of a step are only
Keras's own gradient all-reduce. That one still collides when two fits in
one process reduce gradients of different sizes (different models, or a
strategy with trainable variables): reuse one `MirroredStrategy` object, or
create each with `cross_device_ops=tf.distribute.ReductionToOneDevice()`
(or `HierarchicalCopyAllReduce()` on GPUs), as the README says.
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


def _key_free_reducer(strategy):
    devices = list(strategy.extended.worker_devices)
    if devices and all("GPU" in d.upper() for d in devices):
        return tf.distribute.HierarchicalCopyAllReduce()
    return tf.distribute.ReductionToOneDevice()


def _sum(context, values: list) -> list:
    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MirroredStrategy):
        # Other strategies (e.g. several workers): their own all-reduce.
        return list(context.all_reduce(tf.distribute.ReduceOp.SUM, values))

    def merged(strategy, *per_replica):
        reducer = _key_free_reducer(strategy)
        return reducer.batch_reduce(tf.distribute.ReduceOp.SUM, [(v, v) for v in per_replica])

    return list(context.merge_call(merged, args=tuple(values)))


def sum_over_replicas(value):
    """Sum of `value` (a tensor or a list of tensors) over replicas; no gradient flows through it.

    Not inside a `tf.cond` branch: a cross-replica sum cannot sit in a
    conditional in replica context.
    """
    context = _replica_context()
    if context is None:
        return value
    single = not isinstance(value, (list, tuple))
    values = [tf.stop_gradient(v) for v in ([value] if single else value)]
    reduced = [tf.stop_gradient(v) for v in _sum(context, values)]
    return reduced[0] if single else reduced


def all_true(flag):
    """True on every replica iff `flag` is True on every replica."""
    context = _replica_context()
    if context is None:
        return flag
    failures = sum_over_replicas(tf.cast(tf.logical_not(flag), tf.float32))
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
