import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import Uncertainty, get


def _build(tasks=("a", "b"), **kwargs):
    strategy = Uncertainty(**kwargs)
    strategy.build(list(tasks))
    return strategy


def test_total_and_log_variance_gradient_match_closed_form():
    strategy = _build(("a", "b", "c"))
    s = np.array([0.3, -0.7, 1.2], np.float32)
    strategy.log_variances.assign(s)
    losses = tf.Variable([0.8, 2.5, 0.1])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, True, True]), 0)
    grad_s, grad_l = tape.gradient(total, [strategy.log_variances, losses])
    L = losses.numpy()
    np.testing.assert_allclose(float(total), np.sum(np.exp(-s) * L + s), rtol=1e-6)
    # d total / d s_t = 1 - exp(-s_t) L_t ; d total / d L_t = exp(-s_t).
    np.testing.assert_allclose(grad_s.numpy(), 1 - np.exp(-s) * L, rtol=1e-6)
    np.testing.assert_allclose(grad_l.numpy(), np.exp(-s), rtol=1e-6)
    np.testing.assert_allclose(strategy.task_weights.numpy(), np.exp(-s), rtol=1e-6)


def test_log_variances_are_trainable_and_converge_to_log_loss():
    strategy = _build()
    assert [v.name for v in strategy.trainable_weights] == ["log_variances"]
    optimizer = keras.optimizers.SGD(0.1)
    losses = tf.constant([0.5, 4.0])
    for _ in range(300):
        with tf.GradientTape() as tape:
            total = strategy.combine(losses, tf.constant([True, True]), 0)
        optimizer.apply_gradients(
            zip(tape.gradient(total, strategy.trainable_weights), strategy.trainable_weights, strict=True)
        )
    np.testing.assert_allclose(strategy.log_variances.numpy(), np.log([0.5, 4.0]), atol=1e-3)


def test_regression_tasks_use_gaussian_half_factors():
    strategy = _build(("depth", "label"), regression_tasks=["depth"], init_log_variance=0.5)
    losses = tf.Variable([2.0, 3.0])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, True]), 0)
    grad_s = tape.gradient(total, strategy.log_variances).numpy()
    e = np.exp(-0.5)
    np.testing.assert_allclose(float(total), 0.5 * e * 2.0 + 0.25 + e * 3.0 + 0.5, rtol=1e-6)
    np.testing.assert_allclose(grad_s, [0.5 - 0.5 * e * 2.0, 1 - e * 3.0], rtol=1e-6)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [0.5 * e, e], rtol=1e-6)


def test_masked_task_gets_no_weight_and_no_gradient():
    strategy = _build()
    losses = tf.Variable([1.5, 0.0])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, False]), 0)
    grad_s = tape.gradient(total, strategy.log_variances).numpy()
    np.testing.assert_allclose(float(total), 1.5)
    np.testing.assert_allclose(grad_s, [1 - 1.5, 0.0])
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 0.0])


def test_one_task():
    strategy = _build(("only",), init_log_variance=1.0)
    total = strategy.combine(tf.constant([2.0]), tf.constant([True]), 0)
    np.testing.assert_allclose(float(total), np.exp(-1.0) * 2.0 + 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init_log_variance": float("inf")}, "must be finite"),
        ({"init_log_variance": "0"}, "must be a number"),
        ({"regression_tasks": "depth"}, "must be a list of task names"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        Uncertainty(**kwargs)
    assert "Received:" in str(info.value)


def test_unknown_regression_task_is_an_error():
    with pytest.raises(ValueError, match="names tasks \\['depth'\\] that the model does not have"):
        _build(("a", "b"), regression_tasks=["depth"])


def test_serialization_round_trip_keeps_learned_state():
    strategy = get("uncertainty", init_log_variance=0.2, regression_tasks=["b"])
    strategy.build(["a", "b"])
    strategy.log_variances.assign([0.4, -1.0])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, Uncertainty)
    assert restored.get_config() == strategy.get_config()
    assert restored.get_config()["regression_tasks"] == ["b"]
    np.testing.assert_allclose(restored.log_variances.numpy(), [0.2, 0.2])
    restored.set_weights(strategy.get_weights())
    np.testing.assert_allclose(restored.log_variances.numpy(), [0.4, -1.0])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_combine_in_tf_function(jit_compile):
    strategy = _build()
    strategy.log_variances.assign([1.0, 0.0])
    losses = tf.Variable([1.0, 2.0])

    @tf.function(jit_compile=jit_compile)
    def step():
        with tf.GradientTape() as tape:
            total = strategy.combine(losses, tf.constant([True, True]), tf.constant(0, tf.int64))
        return total, tape.gradient(total, strategy.log_variances)

    total, grad_s = step()
    np.testing.assert_allclose(float(total), np.exp(-1.0) + 1.0 + 2.0, rtol=1e-6)
    np.testing.assert_allclose(grad_s.numpy(), [1 - np.exp(-1.0), 1 - 2.0], rtol=1e-6)
