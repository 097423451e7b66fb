import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import DWA, get

ALL = tf.constant([True, True])


def _combine(strategy, losses, present=ALL):
    return strategy.combine(tf.constant(losses, tf.float32), present, tf.constant(0, tf.int64))


def _dwa_weights(last, previous, temperature):
    r = np.asarray(last) / np.asarray(previous)
    e = np.exp(r / temperature)
    return len(r) * e / e.sum()


def _two_epochs(strategy):
    # epoch 0 means (2.0, 1.0); epoch 1 means (1.0, 0.9)
    for losses in ([3.0, 1.0], [1.0, 1.0]):
        _combine(strategy, losses)
    strategy.on_epoch_end(0)
    for losses in ([1.5, 0.8], [0.5, 1.0]):
        _combine(strategy, losses)
    strategy.on_epoch_end(1)


def test_weights_are_one_for_two_epochs_then_follow_the_loss_ratios():
    strategy = get("dwa")
    assert isinstance(strategy, DWA) and strategy.temperature == 2.0
    strategy.build(["a", "b"])
    total = _combine(strategy, [3.0, 1.0])
    np.testing.assert_allclose(float(total), 4.0)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 1.0])
    _combine(strategy, [1.0, 1.0])
    strategy.on_epoch_end(0)
    np.testing.assert_allclose(strategy.last_means.numpy(), [2.0, 1.0])
    _combine(strategy, [1.5, 0.8])
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 1.0])
    _combine(strategy, [0.5, 1.0])
    strategy.on_epoch_end(1)
    np.testing.assert_allclose(strategy.previous_means.numpy(), [2.0, 1.0])
    np.testing.assert_allclose(strategy.last_means.numpy(), [1.0, 0.9])
    losses = tf.Variable([0.7, 0.6])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, ALL, 0)
    expected = _dwa_weights([1.0, 0.9], [2.0, 1.0], 2.0)  # r = (0.5, 0.9)
    # by hand: w_a = 2 exp(0.25) / (exp(0.25) + exp(0.45)) = 2 / (1 + exp(0.2))
    np.testing.assert_allclose(expected, [2 / (1 + np.exp(0.2)), 2 / (1 + np.exp(-0.2))], rtol=1e-6)
    np.testing.assert_allclose(strategy.task_weights.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(float(total), expected @ [0.7, 0.6], rtol=1e-6)


def test_temperature_changes_the_softness():
    strategy = DWA(temperature=0.5)
    strategy.build(["a", "b"])
    _two_epochs(strategy)
    _combine(strategy, [1.0, 1.0])
    np.testing.assert_allclose(
        strategy.task_weights.numpy(), _dwa_weights([1.0, 0.9], [2.0, 1.0], 0.5), rtol=1e-6
    )


def test_masked_task_records_nothing_and_gets_weight_zero():
    strategy = DWA()
    strategy.build(["a", "b"])
    _combine(strategy, [3.0, 1.0])
    _combine(strategy, [1.0, 0.0], tf.constant([True, False]))
    np.testing.assert_allclose(strategy.epoch_loss_sum.numpy(), [4.0, 1.0])
    np.testing.assert_allclose(strategy.epoch_loss_count.numpy(), [2.0, 1.0])
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 0.0])
    strategy.on_epoch_end(0)
    np.testing.assert_allclose(strategy.last_means.numpy(), [2.0, 1.0])
    # Task b absent for a whole epoch: its history is kept, not overwritten by 0.
    _combine(strategy, [1.0, 0.0], tf.constant([True, False]))
    strategy.on_epoch_end(1)
    np.testing.assert_allclose(strategy.last_means.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(strategy.history.numpy(), [2.0, 1.0])
    _combine(strategy, [1.0, 1.0])
    # a has ratio 0.5, b has too little history and uses ratio 1.
    np.testing.assert_allclose(
        strategy.task_weights.numpy(), _dwa_weights([0.5, 1.0], [1.0, 1.0], 2.0), rtol=1e-6
    )
    # With only one task present, its weight is 1 (weights sum to the number present).
    _combine(strategy, [1.0, 0.0], tf.constant([True, False]))
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 0.0])


def test_no_task_present_gives_zero_not_nan():
    strategy = DWA()
    strategy.build(["a", "b"])
    total = _combine(strategy, [0.0, 0.0], tf.constant([False, False]))
    assert float(total) == 0.0
    np.testing.assert_array_equal(strategy.task_weights.numpy(), [0.0, 0.0])


def test_one_task():
    strategy = DWA()
    strategy.build(["only"])
    for epoch, loss in enumerate([2.0, 1.0, 0.5]):
        total = _combine(strategy, [loss], tf.constant([True]))
        np.testing.assert_allclose(float(total), loss)
        strategy.on_epoch_end(epoch)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0])


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "2"])
def test_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0. Received: temperature="):
        DWA(temperature=temperature)


def test_serialization_round_trip_keeps_state():
    strategy = DWA(temperature=1.5, name="dwa_x")
    strategy.build(["a", "b"])
    _two_epochs(strategy)
    _combine(strategy, [0.3, 0.2])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, DWA) and restored.get_config() == strategy.get_config()
    restored.set_weights(strategy.get_weights())
    for a, b in zip(restored.weights, strategy.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy())
    _combine(strategy, [1.0, 1.0])
    _combine(restored, [1.0, 1.0])
    np.testing.assert_allclose(restored.task_weights.numpy(), strategy.task_weights.numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_combine_in_tf_function(jit_compile):
    strategy = DWA()
    strategy.build(["a", "b"])
    fn = tf.function(strategy.combine, jit_compile=jit_compile)
    for epoch, batches in enumerate([[[3.0, 1.0], [1.0, 1.0]], [[1.5, 0.8], [0.5, 1.0]]]):
        for losses in batches:
            fn(tf.constant(losses), ALL, tf.constant(0, tf.int64))
        strategy.on_epoch_end(epoch)
    total = fn(tf.constant([1.0, 2.0]), ALL, tf.constant(0, tf.int64))
    expected = _dwa_weights([1.0, 0.9], [2.0, 1.0], 2.0)
    np.testing.assert_allclose(strategy.task_weights.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(float(total), expected @ [1.0, 2.0], rtol=1e-6)


def test_non_finite_loss_is_not_recorded():
    strategy = DWA()
    strategy.build(["a", "b"])
    _combine(strategy, [1.0, 2.0])
    _combine(strategy, [float("nan"), 4.0])
    np.testing.assert_allclose(strategy.epoch_loss_sum.numpy(), [1.0, 6.0])
    np.testing.assert_allclose(strategy.epoch_loss_count.numpy(), [1.0, 2.0])
