import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import Equal, Static, get


def _combine(strategy, losses, present):
    losses = tf.constant(losses, tf.float32)
    step = tf.constant(0, tf.int64)
    return strategy.combine(losses, losses, tf.constant(present), step, strategy.state())


def test_equal_is_sum_of_present_losses():
    strategy = get("equal")
    assert isinstance(strategy, Equal) and strategy.level == "loss"
    strategy.build(["a", "b", "c"])
    total, weights, new_state = _combine(strategy, [0.5, 2.0, 1.0], [True, True, True])
    np.testing.assert_allclose(float(total), 3.5)
    np.testing.assert_allclose(weights.numpy(), [1, 1, 1])
    assert new_state == {}
    total, weights, _ = _combine(strategy, [0.5, 0.0, 1.0], [True, False, True])
    np.testing.assert_allclose(float(total), 1.5)
    np.testing.assert_allclose(weights.numpy(), [1, 0, 1])


def test_static_uses_named_weights_in_task_order():
    strategy = Static(weights={"b": 0.25, "a": 2.0})
    strategy.build(["a", "b"])
    losses = tf.Variable([1.0, 4.0])
    with tf.GradientTape() as tape:
        total, weights, new_state = strategy.combine(
            losses, tf.constant([1.0, 4.0]), tf.constant([True, True]), 0, strategy.state()
        )
    np.testing.assert_allclose(float(total), 2.0 * 1.0 + 0.25 * 4.0)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), [2.0, 0.25])
    np.testing.assert_allclose(weights.numpy(), [2.0, 0.25])
    assert new_state == {}


def test_static_list_weights_masked_task_and_numpy_scalars():
    strategy = Static(weights=[np.float32(1.0), np.int64(3)])
    strategy.build(["a", "b"])
    total, weights, _ = _combine(strategy, [1.0, 0.0], [True, False])
    np.testing.assert_allclose(float(total), 1.0)
    np.testing.assert_allclose(weights.numpy(), [1.0, 0.0])
    assert strategy.get_config()["weights"] == [1.0, 3.0]


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": -1.0}, r"`weights\['a'\]` must be a finite number >= 0"),
        ({"a": float("nan")}, r"`weights\['a'\]` must be a finite number >= 0"),
        ([1.0, True], r"`weights\[1\]` must be a finite number"),
        ([1.0, "x"], r"`weights\[1\]` must be a finite number"),
        ({}, "must not be empty"),
        ("a", "must be a dict"),
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


def test_static_round_trip_and_jit():
    # Static is not in kmtl.weighting.names() (it needs its weights), so the
    # contract suite does not cover it.
    strategy = Static(weights={"a": 0.5, "b": 2.0})
    strategy.build(["a", "b"])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert type(restored) is Static and restored.get_config() == strategy.get_config()
    assert restored.built and restored.task_names == ["a", "b"]
    fn = tf.function(restored.combine, jit_compile=True)
    losses = tf.constant([2.0, 1.0])
    total, weights, _ = fn(
        losses, losses, tf.constant([True, False]), tf.constant(0, tf.int64), restored.state()
    )
    np.testing.assert_allclose(float(total), 1.0)
    np.testing.assert_allclose(weights.numpy(), [0.5, 0.0])
    np.testing.assert_allclose(restored.aggregate(np.array([[1.0, 0.0], [0.0, 1.0]])).numpy(), [0.5, 2.0])
