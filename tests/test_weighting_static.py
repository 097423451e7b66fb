import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import Equal, Static, get


def _run(strategy, losses, present, step=0):
    return strategy.combine(
        tf.constant(losses, tf.float32), tf.constant(present), tf.constant(step, tf.int64)
    )


def test_equal_is_sum_of_present_losses():
    strategy = get("equal")
    assert isinstance(strategy, Equal) and strategy.level == "loss"
    strategy.build(["a", "b", "c"])
    np.testing.assert_allclose(float(_run(strategy, [0.5, 2.0, 1.0], [True, True, True])), 3.5)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1, 1, 1])
    np.testing.assert_allclose(float(_run(strategy, [0.5, 0.0, 1.0], [True, False, True])), 1.5)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1, 0, 1])


def test_static_uses_named_weights_in_task_order():
    strategy = Static(weights={"b": 0.25, "a": 2.0})
    strategy.build(["a", "b"])
    losses = tf.Variable([1.0, 4.0])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, True]), 0)
    np.testing.assert_allclose(float(total), 2.0 * 1.0 + 0.25 * 4.0)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), [2.0, 0.25])
    np.testing.assert_allclose(strategy.task_weights.numpy(), [2.0, 0.25])


def test_static_list_weights_and_masked_task():
    strategy = Static(weights=[1.0, 3.0])
    strategy.build(["a", "b"])
    np.testing.assert_allclose(float(_run(strategy, [1.0, 0.0], [True, False])), 1.0)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 0.0])


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": -1.0}, "must be finite and >= 0"),
        ({"a": float("nan")}, "must be finite and >= 0"),
        ({}, "must not be empty"),
        ("a", "must be a dict"),
        ([1.0, "x"], "must be a number"),
    ],
)
def test_static_rejects_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message) as info:
        Static(weights=weights)
    assert "Received:" in str(info.value)


def test_static_checks_task_names_at_build():
    with pytest.raises(ValueError, match="missing: \\['b'\\], unknown: \\['c'\\]"):
        Static(weights={"a": 1.0, "c": 1.0}).build(["a", "b"])
    with pytest.raises(ValueError, match="has 3 entries but the model has 2 tasks"):
        Static(weights=[1.0, 1.0, 1.0]).build(["a", "b"])


def test_one_task():
    for strategy in (Equal(), Static(weights={"only": 0.5})):
        strategy.build(["only"])
        np.testing.assert_allclose(
            float(_run(strategy, [3.0], [True])), 3.0 * (0.5 if isinstance(strategy, Static) else 1)
        )


@pytest.mark.parametrize(
    "strategy", [Equal(name="eq"), Static(weights={"a": 0.5, "b": 2.0})], ids=["equal", "static"]
)
def test_serialization_round_trip(strategy):
    strategy.build(["a", "b"])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert type(restored) is type(strategy)
    assert restored.get_config() == strategy.get_config()
    assert restored.built and restored.task_names == ["a", "b"]
    _run(strategy, [1.0, 1.0], [True, False])
    restored.set_weights(strategy.get_weights())
    np.testing.assert_allclose(restored.task_weights.numpy(), strategy.task_weights.numpy())
    np.testing.assert_allclose(
        float(_run(restored, [1.0, 2.0], [True, True])), float(_run(strategy, [1.0, 2.0], [True, True]))
    )


@pytest.mark.parametrize("jit_compile", [False, True])
def test_combine_in_tf_function(jit_compile):
    strategy = Static(weights={"a": 0.5, "b": 2.0})
    strategy.build(["a", "b"])
    fn = tf.function(strategy.combine, jit_compile=jit_compile)
    total = fn(tf.constant([2.0, 1.0]), tf.constant([True, False]), tf.constant(0, tf.int64))
    np.testing.assert_allclose(float(total), 1.0)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [0.5, 0.0])
