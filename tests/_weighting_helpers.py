"""Helpers shared by the strategy tests (not a test module)."""

import numpy as np
import tensorflow as tf


def pcgrad_reference(G, orders):
    """PCGrad done on the gradients themselves, with the given visiting orders."""
    out = []
    for i, order in enumerate(orders):
        g = G[i].copy()
        for j in order:
            if j != i and g @ G[j] < 0:
                g = g - (g @ G[j]) / (G[j] @ G[j]) * G[j]
        out.append(g)
    return np.sum(out, axis=0)


def combine_stateless(strategy, losses, present, values=None):
    """`(total, weights, d total / d losses)` of a stateless loss-level strategy's `combine`."""
    losses = tf.Variable(losses, dtype=tf.float32)
    values = tf.constant(losses) if values is None else tf.constant(values, tf.float32)
    with tf.GradientTape() as tape:
        total, weights, new_state = strategy.combine(
            losses, values, tf.constant(present), 0, strategy.state()
        )
    assert new_state == {}
    return float(total), weights.numpy(), tape.gradient(total, losses).numpy()
