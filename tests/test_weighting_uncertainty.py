import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import Uncertainty, get

ALL2 = tf.constant([True, True])


def _build(tasks=("a", "b"), **kwargs):
    strategy = Uncertainty(**kwargs)
    strategy.build(list(tasks))
    return strategy


def _combine_with_grads(strategy, losses, present):
    losses = tf.Variable(losses, dtype=tf.float32)
    with tf.GradientTape() as tape:
        total, weights, new_state = strategy.combine(
            losses, tf.constant(losses), tf.constant(present), tf.constant(0, tf.int64), strategy.state()
        )
    grad_s, grad_l = tape.gradient(total, [strategy.log_variances, losses])
    assert new_state == {}
    return float(total), weights.numpy(), grad_s.numpy(), grad_l.numpy()


def test_full_form_total_and_gradients_match_closed_form():
    strategy = _build(("a", "b", "c"))
    s = np.array([0.3, -0.7, 1.2], np.float32)
    strategy.log_variances.assign(s)
    L = np.array([0.8, 2.5, 0.1], np.float32)
    total, weights, grad_s, grad_l = _combine_with_grads(strategy, L, [True, True, True])
    np.testing.assert_allclose(total, np.sum(np.exp(-s) * L + s), rtol=1e-6)
    # d total / d s_t = 1 - exp(-s_t) L_t ; d total / d L_t = exp(-s_t) = the weights.
    np.testing.assert_allclose(grad_s, 1 - np.exp(-s) * L, rtol=1e-6)
    np.testing.assert_allclose(grad_l, np.exp(-s), rtol=1e-6)
    np.testing.assert_allclose(weights, np.exp(-s), rtol=1e-6)


def test_regression_tasks_use_gaussian_half_factors():
    strategy = _build(("depth", "label"), regression_tasks=["depth"], init_log_variance=0.5)
    total, weights, grad_s, _ = _combine_with_grads(strategy, [2.0, 3.0], [True, True])
    e = np.exp(-0.5)
    np.testing.assert_allclose(total, 0.5 * e * 2.0 + 0.25 + e * 3.0 + 0.5, rtol=1e-6)
    np.testing.assert_allclose(grad_s, [0.5 - 0.5 * e * 2.0, 1 - e * 3.0], rtol=1e-6)
    np.testing.assert_allclose(weights, [0.5 * e, e], rtol=1e-6)


def test_half_form_is_libmtl_uw_with_its_initial_value():
    # LibMTL's UW: sum_t L_t / (2 exp(s_t)) + s_t / 2 with s_t starting at -0.5.
    strategy = _build(form="half")
    np.testing.assert_allclose(strategy.log_variances.numpy(), [-0.5, -0.5])
    L = np.array([0.4, 3.0])
    total, weights, grad_s, grad_l = _combine_with_grads(strategy, L, [True, True])
    s = -0.5
    np.testing.assert_allclose(total, np.sum(L / (2 * np.exp(s)) + s / 2), rtol=1e-6)
    np.testing.assert_allclose(weights, [1 / (2 * np.exp(s))] * 2, rtol=1e-6)
    np.testing.assert_allclose(grad_l, weights, rtol=1e-6)
    np.testing.assert_allclose(grad_s, 0.5 - L / (2 * np.exp(s)), rtol=1e-6)
    assert _build(form="half", init_log_variance=1.0).log_variances.numpy()[0] == 1.0


@pytest.mark.parametrize("form", ["full", "half"])
def test_log_variances_are_trainable_and_converge_to_log_loss(form):
    strategy = _build(form=form)
    assert [v.name for v in strategy.trainable_weights] == ["log_variances"]
    optimizer = keras.optimizers.SGD(0.2)
    losses = tf.constant([0.5, 4.0])
    step = tf.constant(0, tf.int64)
    for _ in range(300):
        with tf.GradientTape() as tape:
            total, _, _ = strategy.combine(losses, losses, ALL2, step, strategy.state())
        optimizer.apply_gradients(
            zip(tape.gradient(total, strategy.trainable_weights), strategy.trainable_weights, strict=True)
        )
    np.testing.assert_allclose(strategy.log_variances.numpy(), np.log([0.5, 4.0]), atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init_log_variance": float("inf")}, "`init_log_variance` must be a finite number"),
        ({"init_log_variance": "0"}, "`init_log_variance` must be a finite number"),
        ({"init_log_variance": True}, "`init_log_variance` must be a finite number"),
        ({"regression_tasks": "depth"}, "`regression_tasks` must be a list of task names"),
        ({"form": "libmtl"}, "`form` must be one of"),
        ({"form": "half", "regression_tasks": ["a"]}, "only applies to form='full'"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        Uncertainty(**kwargs)
    assert "Received:" in str(info.value)


def test_unknown_regression_task_is_an_error():
    with pytest.raises(ValueError, match="names tasks \\['depth'\\] that the model does not have"):
        _build(("a", "b"), regression_tasks=["depth"])


def test_config_keeps_form_and_resolved_initial_value():
    strategy = get("uncertainty", form="half", init_log_variance=np.float32(-1.0))
    strategy.build(["a", "b"])
    config = strategy.get_config()
    assert config["form"] == "half" and config["init_log_variance"] == -1.0
    assert Uncertainty(form="half").get_config()["init_log_variance"] == -0.5
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert restored.get_config() == config
    np.testing.assert_allclose(restored.log_variances.numpy(), [-1.0, -1.0])
