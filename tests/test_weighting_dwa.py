import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import DWA, get

ALL = [True, True]


def _step(strategy, losses, present=ALL, commit=True):
    """One training step: combine, then commit as the training step does."""
    losses = tf.constant(losses, tf.float32)
    total, weights, new_state = strategy.combine(
        losses, losses, tf.constant(present), tf.constant(0, tf.int64), strategy.state()
    )
    if commit:
        strategy.commit({**new_state, "task_weights": weights})
    return float(total), weights.numpy(), new_state


def _dwa_weights(last, previous, temperature):
    r = np.asarray(last) / np.asarray(previous)
    e = np.exp(r / temperature)
    return len(r) * e / e.sum()


def _two_epochs(strategy):
    # epoch 0 means (2.0, 1.0); epoch 1 means (1.0, 0.9)
    for losses in ([3.0, 1.0], [1.0, 1.0]):
        _step(strategy, losses)
    strategy.on_epoch_end(0)
    for losses in ([1.5, 0.8], [0.5, 1.0]):
        _step(strategy, losses)
    strategy.on_epoch_end(1)


def test_weights_are_one_for_two_epochs_then_follow_the_loss_ratios():
    strategy = get("dwa")
    assert isinstance(strategy, DWA) and strategy.temperature == 2.0
    strategy.build(["a", "b"])
    total, weights, new_state = _step(strategy, [3.0, 1.0])
    assert total == 4.0
    np.testing.assert_allclose(weights, [1.0, 1.0])
    np.testing.assert_allclose(new_state["epoch_loss_sum"].numpy(), [3.0, 1.0])
    _step(strategy, [1.0, 1.0])
    strategy.on_epoch_end(0)
    np.testing.assert_allclose(strategy.last_means.numpy(), [2.0, 1.0])
    _, weights, _ = _step(strategy, [1.5, 0.8])
    np.testing.assert_allclose(weights, [1.0, 1.0])
    _step(strategy, [0.5, 1.0])
    strategy.on_epoch_end(1)
    np.testing.assert_allclose(strategy.previous_means.numpy(), [2.0, 1.0])
    np.testing.assert_allclose(strategy.last_means.numpy(), [1.0, 0.9])
    losses = tf.Variable([0.7, 0.6])
    with tf.GradientTape() as tape:
        total, weights, _ = strategy.combine(
            losses, tf.constant([0.7, 0.6]), tf.constant(ALL), 0, strategy.state()
        )
    expected = _dwa_weights([1.0, 0.9], [2.0, 1.0], 2.0)  # r = (0.5, 0.9)
    # by hand: w_a = 2 exp(0.25) / (exp(0.25) + exp(0.45)) = 2 / (1 + exp(0.2))
    np.testing.assert_allclose(expected, [2 / (1 + np.exp(0.2)), 2 / (1 + np.exp(-0.2))], rtol=1e-6)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(float(total), expected @ [0.7, 0.6], rtol=1e-6)


def test_temperature_changes_the_softness():
    strategy = DWA(temperature=np.float64(0.5))
    strategy.build(["a", "b"])
    _two_epochs(strategy)
    _, weights, _ = _step(strategy, [1.0, 1.0])
    np.testing.assert_allclose(weights, _dwa_weights([1.0, 0.9], [2.0, 1.0], 0.5), rtol=1e-6)


def test_records_the_global_values_not_the_replica_losses():
    strategy = DWA()
    strategy.build(["a", "b"])
    shares = tf.constant([0.1, 0.2])
    _, _, new_state = strategy.combine(shares, tf.constant([3.0, 1.0]), tf.constant(ALL), 0, strategy.state())
    np.testing.assert_allclose(new_state["epoch_loss_sum"].numpy(), [3.0, 1.0])
    np.testing.assert_allclose(new_state["epoch_loss_count"].numpy(), [1.0, 1.0])


def test_masked_task_records_nothing_and_keeps_its_history():
    strategy = DWA()
    strategy.build(["a", "b"])
    _step(strategy, [3.0, 1.0])
    _, weights, _ = _step(strategy, [1.0, 0.0], [True, False])
    np.testing.assert_allclose(strategy.epoch_loss_sum.numpy(), [4.0, 1.0])
    np.testing.assert_allclose(strategy.epoch_loss_count.numpy(), [2.0, 1.0])
    np.testing.assert_allclose(weights, [1.0, 0.0])
    strategy.on_epoch_end(0)
    np.testing.assert_allclose(strategy.last_means.numpy(), [2.0, 1.0])
    # Task b absent for a whole epoch: its history is kept, not overwritten by 0.
    _step(strategy, [1.0, 0.0], [True, False])
    strategy.on_epoch_end(1)
    np.testing.assert_allclose(strategy.last_means.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(strategy.history.numpy(), [2.0, 1.0])
    # a has ratio 0.5, b has too little history and uses ratio 1.
    _, weights, _ = _step(strategy, [1.0, 1.0])
    np.testing.assert_allclose(weights, _dwa_weights([0.5, 1.0], [1.0, 1.0], 2.0), rtol=1e-6)
    # With only one task present, its weight is 1 (weights sum to the number present).
    _, weights, _ = _step(strategy, [1.0, 0.0], [True, False])
    np.testing.assert_allclose(weights, [1.0, 0.0])


def test_uncommitted_step_and_non_finite_loss_record_nothing():
    strategy = DWA()
    strategy.build(["a", "b"])
    _step(strategy, [1.0, 2.0])
    _step(strategy, [5.0, 5.0], commit=False)  # a rejected batch
    _, _, new_state = _step(strategy, [float("nan"), 4.0])
    np.testing.assert_allclose(new_state["epoch_loss_sum"].numpy(), [1.0, 6.0])
    np.testing.assert_allclose(strategy.epoch_loss_count.numpy(), [1.0, 2.0])


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "2", True])
def test_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0. Received: temperature="):
        DWA(temperature=temperature)
