import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import GLS, get


def _build(tasks=("a", "b", "c"), **kwargs):
    strategy = GLS(**kwargs)
    strategy.build(list(tasks))
    return strategy


def test_total_is_the_geometric_mean_and_its_gradient():
    strategy = get("gls")
    assert isinstance(strategy, GLS)
    strategy.build(["a", "b", "c"])
    values = np.array([0.5, 2.0, 8.0])
    losses = tf.Variable(values, dtype=tf.float32)
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, True, True]), 0)
    geometric_mean = (0.5 * 2.0 * 8.0) ** (1 / 3)  # = 2
    np.testing.assert_allclose(float(total), geometric_mean, rtol=1e-6)
    # d/dL_t (prod L)^(1/T) = (prod L)^(1/T) / (T L_t)
    expected = geometric_mean / (3 * values)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(strategy.task_weights.numpy(), expected, rtol=1e-6)


def test_log_space_is_stable_for_many_small_losses():
    strategy = _build(tuple(f"t{i}" for i in range(40)))
    values = np.full(40, 1e-3, np.float32)  # the plain product underflows float32
    total = strategy.combine(tf.constant(values), tf.ones((40,), tf.bool), 0)
    np.testing.assert_allclose(float(total), 1e-3, rtol=1e-4)


def test_masked_task_is_left_out_without_log_of_zero():
    strategy = _build()
    losses = tf.Variable([0.5, 0.0, 2.0])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, False, True]), 0)
    np.testing.assert_allclose(float(total), 1.0, rtol=1e-6)  # sqrt(0.5 * 2)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), [1.0, 0.0, 0.25], rtol=1e-6)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 0.0, 0.25], rtol=1e-6)
    total = strategy.combine(tf.zeros((3,)), tf.constant([False, False, False]), 0)
    assert float(total) == 0.0 and np.isfinite(strategy.task_weights.numpy()).all()


def test_one_task_is_the_loss_itself():
    strategy = _build(("only",))
    losses = tf.Variable([3.0])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True]), 0)
    np.testing.assert_allclose(float(total), 3.0, rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), [1.0], rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, float("nan"), None])
def test_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0. Received: eps="):
        GLS(eps=eps)


def test_serialization_round_trip():
    strategy = _build(eps=1e-4)
    strategy.combine(tf.constant([0.5, 2.0, 1.0]), tf.constant([True, True, True]), 0)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, GLS) and restored.get_config() == strategy.get_config()
    restored.set_weights(strategy.get_weights())
    np.testing.assert_allclose(restored.task_weights.numpy(), strategy.task_weights.numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_combine_in_tf_function(jit_compile):
    strategy = _build()
    fn = tf.function(strategy.combine, jit_compile=jit_compile)
    total = fn(tf.constant([0.5, 2.0, 8.0]), tf.constant([True, True, True]), tf.constant(0, tf.int64))
    np.testing.assert_allclose(float(total), 2.0, rtol=1e-5)
