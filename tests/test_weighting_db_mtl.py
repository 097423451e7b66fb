import numpy as np
import pytest
import tensorflow as tf
from _weighting_helpers import combine_stateless

from kmtl.weighting import DBMTL, get


def _build(tasks=("a", "b"), **kwargs):
    strategy = DBMTL(**kwargs)
    strategy.build(list(tasks))
    return strategy


def test_total_is_sum_of_log_losses_and_gradient_is_inverse_loss():
    strategy = get("db_mtl")
    assert isinstance(strategy, DBMTL)
    strategy.build(["a", "b", "c"])
    total, weights, grad = combine_stateless(strategy, [0.5, 2.0, 10.0], [True, True, True])
    np.testing.assert_allclose(total, np.log(0.5) + np.log(2.0) + np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(grad, [2.0, 0.5, 0.1], rtol=1e-6)
    np.testing.assert_allclose(weights, [2.0, 0.5, 0.1], rtol=1e-6)


def test_replica_shares_get_the_weights_of_the_global_values():
    # Two replicas with shares s1 + s2 = L: the summed gradients are those of log(L).
    strategy = _build()
    values = [0.5, 4.0]
    _, weights, grad = combine_stateless(strategy, [0.1, 3.0], [True, True], values=values)
    np.testing.assert_allclose(weights, [2.0, 0.25], rtol=1e-6)
    np.testing.assert_allclose(grad, [2.0, 0.25], rtol=1e-6)


def test_scale_invariance_of_the_update_direction():
    # Multiplying a task's loss by a constant does not change d total / d theta.
    strategy = _build()
    theta = tf.Variable([0.3, -0.2])

    def grad(scale):
        with tf.GradientTape() as tape:
            losses = tf.stack([scale * tf.reduce_sum(tf.square(theta - 1.0)), tf.reduce_sum(tf.exp(theta))])
            total, _, _ = strategy.combine(losses, tf.stop_gradient(losses), tf.constant([True, True]), 0, {})
        return tape.gradient(total, theta).numpy()

    np.testing.assert_allclose(grad(1.0), grad(1000.0), rtol=1e-5)


def test_masked_task_is_left_out_and_zero_loss_is_finite():
    strategy = _build(eps=1e-6)
    total, weights, grad = combine_stateless(strategy, [0.5, 0.0], [True, False])
    np.testing.assert_allclose(total, np.log(0.5 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(grad, [1 / (0.5 + 1e-6), 0.0], rtol=1e-6)
    np.testing.assert_allclose(weights, [1 / (0.5 + 1e-6), 0.0], rtol=1e-6)
    total, weights, _ = combine_stateless(strategy, [0.0, 1.0], [True, True])
    np.testing.assert_allclose(total, np.log(1e-6) + np.log(1.0 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(weights, [1e6, 1 / (1 + 1e-6)], rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, -1e-8, float("inf"), "1e-8", True])
def test_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0. Received: eps="):
        DBMTL(eps=eps)
