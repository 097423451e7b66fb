import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import DBMTL, get


def _build(tasks=("a", "b"), **kwargs):
    strategy = DBMTL(**kwargs)
    strategy.build(list(tasks))
    return strategy


def test_total_is_sum_of_log_losses_and_gradient_is_inverse_loss():
    strategy = get("db_mtl")
    assert isinstance(strategy, DBMTL)
    strategy.build(["a", "b", "c"])
    losses = tf.Variable([0.5, 2.0, 10.0])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, True, True]), 0)
    np.testing.assert_allclose(float(total), np.log(0.5) + np.log(2.0) + np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), [2.0, 0.5, 0.1], rtol=1e-6)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [2.0, 0.5, 0.1], rtol=1e-6)


def test_scale_invariance_of_the_update_direction():
    # Multiplying a task's loss by a constant does not change d total / d theta.
    strategy = _build()
    theta = tf.Variable([0.3, -0.2])

    def grad(scale):
        with tf.GradientTape() as tape:
            losses = tf.stack([scale * tf.reduce_sum(tf.square(theta - 1.0)), tf.reduce_sum(tf.exp(theta))])
            total = strategy.combine(losses, tf.constant([True, True]), 0)
        return tape.gradient(total, theta).numpy()

    np.testing.assert_allclose(grad(1.0), grad(1000.0), rtol=1e-5)


def test_masked_task_is_left_out_without_log_of_zero():
    strategy = _build()
    losses = tf.Variable([0.5, 0.0])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, False]), 0)
    np.testing.assert_allclose(float(total), np.log(0.5), rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), [2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [2.0, 0.0], rtol=1e-6)
    total = strategy.combine(tf.constant([0.0, 0.0]), tf.constant([False, False]), 0)
    assert float(total) == 0.0


def test_zero_loss_of_a_present_task_is_finite():
    strategy = _build(eps=1e-6)
    total = strategy.combine(tf.constant([0.0, 1.0]), tf.constant([True, True]), 0)
    np.testing.assert_allclose(float(total), np.log(1e-6) + np.log(1.0 + 1e-6), rtol=1e-6)
    assert np.isfinite(strategy.task_weights.numpy()).all()


def test_one_task():
    strategy = _build(("only",))
    total = strategy.combine(tf.constant([np.e]), tf.constant([True]), 0)
    np.testing.assert_allclose(float(total), 1.0, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, -1e-8, float("inf"), "1e-8"])
def test_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0. Received: eps="):
        DBMTL(eps=eps)


def test_serialization_round_trip():
    strategy = _build(eps=1e-5, name="log_losses")
    strategy.combine(tf.constant([0.5, 2.0]), tf.constant([True, True]), 0)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, DBMTL) and restored.get_config() == strategy.get_config()
    assert restored.eps == 1e-5
    restored.set_weights(strategy.get_weights())
    np.testing.assert_allclose(restored.task_weights.numpy(), strategy.task_weights.numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_combine_in_tf_function(jit_compile):
    strategy = _build()
    fn = tf.function(strategy.combine, jit_compile=jit_compile)
    total = fn(tf.constant([0.5, 4.0]), tf.constant([True, True]), tf.constant(0, tf.int64))
    np.testing.assert_allclose(float(total), np.log(2.0), rtol=1e-5)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [2.0, 0.25], rtol=1e-5)
