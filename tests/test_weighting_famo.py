import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import FAMO, get

LN2 = np.log(2.0)


def _build(tasks=("a", "b"), **kwargs):
    strategy = FAMO(**kwargs)
    strategy.build(list(tasks))
    return strategy


def _step(strategy, losses, present=None):
    """One committed step (`previous_batch`); returns (total, weights, new_state)."""
    present = [True] * len(losses) if present is None else present
    losses = tf.constant(losses, tf.float32)
    total, weights, new_state = strategy.combine(
        losses, losses, tf.constant(present), tf.constant(0, tf.int64), strategy.state()
    )
    strategy.commit({**new_state, "task_weights": weights})
    return float(total), weights.numpy(), new_state


def _after(strategy, before, after, present=None):
    """`same_batch`: the committed update from one batch's losses before and after the step."""
    present = [True] * len(before) if present is None else present
    new_state = strategy.after_step(
        tf.constant(before, tf.float32),
        tf.constant(after, tf.float32),
        tf.constant(present),
        0,
        strategy.state(),
    )
    strategy.commit(new_state)
    return new_state


def _famo_weights(xi, losses):
    z = np.exp(xi) / np.exp(xi).sum()
    inverse = z / np.asarray(losses)
    return inverse / inverse.sum()


def _reference_adam(deltas, lr=0.025, wd=1e-3):
    """NumPy Adam on the logits (torch.optim.Adam with L2 weight decay, as in the authors' code)."""
    xi = np.zeros(len(deltas[0]))
    m, v = np.zeros_like(xi), np.zeros_like(xi)
    for k, delta in enumerate(deltas, start=1):
        z = np.exp(xi) / np.exp(xi).sum()
        g = z * (delta - z @ delta) + wd * xi
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        xi = xi - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
    return xi


def test_two_task_sgd_logit_update_by_hand():
    strategy = get("famo", optimizer="sgd", learning_rate=0.1, weight_decay=0.0)
    strategy.build(["a", "b"])
    assert not strategy.needs_losses_after_step
    _, weights, new_state = _step(strategy, [1.0, 1.0])
    np.testing.assert_array_equal(new_state["logits"].numpy(), [0.0, 0.0])  # no previous step yet
    np.testing.assert_allclose(weights, [0.5, 0.5])
    losses = tf.Variable([0.5, 1.0])
    with tf.GradientTape() as tape:
        total, weights, new_state = strategy.combine(
            losses, tf.constant([0.5, 1.0]), tf.constant([True, True]), 1, strategy.state()
        )
    # delta = log(prev) - log(now) = (ln 2, 0); z = (1/2, 1/2);
    # d_t = z_t (delta_t - z . delta) = (+ln2/4, -ln2/4); xi = -lr * d.
    xi = np.array([-0.1 * LN2 / 4, 0.1 * LN2 / 4])
    np.testing.assert_allclose(new_state["logits"].numpy(), xi, rtol=1e-6)
    # Task a improved faster, so it loses weight relative to the loss-only FAMO weights.
    w = _famo_weights(xi, [0.5, 1.0])
    np.testing.assert_allclose(weights.numpy(), w, rtol=1e-6)
    assert w[0] < 2 / 3
    # The gradient is sum_t c_t grad log L_t with c_t = z_t / sum_j (z_j / L_j).
    z = np.exp(xi) / np.exp(xi).sum()
    c = z / np.sum(z / np.array([0.5, 1.0]))
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), c / np.array([0.5, 1.0]), rtol=1e-6)
    np.testing.assert_allclose(float(total), 1 / np.sum(z / np.array([0.5, 1.0])), rtol=1e-6)
    # Nothing was assigned: combine is pure.
    np.testing.assert_array_equal(strategy.logits.numpy(), [0.0, 0.0])


def test_weight_decay_pulls_logits_to_zero_sgd():
    strategy = _build(optimizer="sgd", learning_rate=0.1, weight_decay=0.5)
    strategy.logits.assign([1.0, -1.0])
    _step(strategy, [1.0, 1.0])
    np.testing.assert_allclose(strategy.logits.numpy(), [1.0, -1.0])
    _step(strategy, [1.0, 1.0])  # delta = 0: only the decay acts
    np.testing.assert_allclose(strategy.logits.numpy(), [1.0 - 0.1 * 0.5, -1.0 + 0.1 * 0.5], rtol=1e-6)


def test_adam_matches_a_numpy_reference_over_many_steps():
    rng = np.random.default_rng(0)
    sequence = rng.uniform(0.2, 3.0, size=(12, 3)).astype(np.float32)
    strategy = _build(("a", "b", "c"))
    for losses in sequence:
        _step(strategy, losses.tolist())
    s = sequence.astype(np.float64)
    deltas = [np.log(s[k - 1]) - np.log(s[k]) for k in range(1, len(s))]
    np.testing.assert_allclose(strategy.logits.numpy(), _reference_adam(deltas), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(strategy.adam_steps.numpy(), [11.0] * 3)


def test_weights_come_from_the_global_values():
    strategy = _build()
    shares = tf.constant([0.1, 0.1])  # this replica's shares: not what the weights use
    _, weights, _ = strategy.combine(
        shares, tf.constant([1.0, 3.0]), tf.constant([True, True]), 0, strategy.state()
    )
    np.testing.assert_allclose(weights.numpy(), [0.75, 0.25], rtol=1e-6)


def test_absent_task_does_not_change_its_state_or_the_others_update():
    three = _build(("a", "b", "c"))
    two = _build(("a", "c"))
    sequence = [[1.0, 2.0, 1.5], [0.8, 0.0, 1.4], [0.5, 0.0, 1.45], [0.45, 0.0, 1.2]]
    for step, losses in enumerate(sequence):
        present = [True, step == 0, True]
        before = {name: value.numpy().copy() for name, value in three.state().items()}
        _, weights, _ = _step(three, losses, present)
        _, weights_two, _ = _step(two, [losses[0], losses[2]])
        if step > 0:
            for name in ("logits", "adam_m", "adam_v", "adam_steps", "previous_losses"):
                assert three.state()[name].numpy()[1] == before[name][1], name
            assert weights[1] == 0.0
            np.testing.assert_allclose(weights[[0, 2]], weights_two, rtol=1e-6)
        np.testing.assert_allclose(three.logits.numpy()[[0, 2]], two.logits.numpy(), rtol=1e-6)
    # Back after an absence: no update from a stale pair of losses.
    _step(three, [0.4, 1.0, 1.0])
    assert three.logits.numpy()[1] == 0.0


def test_zero_and_non_finite_losses_keep_the_state_finite():
    strategy = _build()
    for losses in (
        [1.0, 1.0],
        [0.0, 1.0],
        [0.0, 0.0],
        [1e-12, 5.0],
        [float("nan"), 0.5],
        [float("inf"), 0.4],
    ):
        _step(strategy, losses)
        for name, value in strategy.state().items():
            assert np.isfinite(value.numpy()).all(), (losses, name)
    _step(strategy, [0.9, 0.3])
    np.testing.assert_allclose(strategy.previous_losses.numpy(), [0.9, 0.3], rtol=1e-6)


# --- update="same_batch": the authors' convention ----------------------------------
def test_same_batch_combine_reads_the_logits_and_after_step_updates_them_by_hand():
    strategy = _build(update="same_batch", optimizer="sgd", learning_rate=0.1, weight_decay=0.0)
    assert strategy.needs_losses_after_step and not FAMO.needs_losses_after_step
    assert "previous_losses" not in strategy.state()
    strategy.logits.assign([0.2, -0.2])
    losses = tf.constant([1.0, 3.0])
    _, weights, new_state = strategy.combine(losses, losses, tf.constant([True, True]), 0, strategy.state())
    assert new_state == {}
    np.testing.assert_allclose(weights.numpy(), _famo_weights(np.array([0.2, -0.2]), [1.0, 3.0]), rtol=1e-6)
    # Same batch after the update: task a went 1.0 -> 0.5 (delta ln 2), b stayed at 3.0 (delta 0).
    new_state = _after(strategy, [1.0, 3.0], [0.5, 3.0])
    z = np.exp([0.2, -0.2]) / np.exp([0.2, -0.2]).sum()
    delta = np.array([LN2, 0.0])
    expected = np.array([0.2, -0.2]) - 0.1 * z * (delta - z @ delta)
    np.testing.assert_allclose(new_state["logits"].numpy(), expected, rtol=1e-6)
    assert set(new_state) == {"logits"}
    np.testing.assert_allclose(strategy.logits.numpy(), expected, rtol=1e-6)


def test_same_batch_adam_matches_the_numpy_reference():
    rng = np.random.default_rng(1)
    before = rng.uniform(0.5, 2.0, size=(8, 3))
    after = before * rng.uniform(0.7, 1.05, size=(8, 3))
    strategy = _build(("a", "b", "c"), update="same_batch")
    for b, a in zip(before, after, strict=True):
        _after(strategy, b.tolist(), a.tolist())
    deltas = [
        np.log(b.astype(np.float32)) - np.log(a.astype(np.float32))
        for b, a in zip(before, after, strict=True)
    ]
    np.testing.assert_allclose(strategy.logits.numpy(), _reference_adam(deltas), rtol=1e-4, atol=1e-6)


def test_same_batch_after_step_skips_absent_and_non_finite_tasks():
    strategy = _build(("a", "b", "c"), update="same_batch")
    new_state = _after(strategy, [1.0, 2.0, 1.0], [0.5, 123.0, float("nan")], present=[True, False, True])
    # Only task a is in the pair: a one-task softmax has zero gradient, and zero logits no decay.
    np.testing.assert_array_equal(new_state["logits"].numpy(), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(strategy.adam_steps.numpy(), [1.0, 0.0, 0.0])
    _after(strategy, [1.0, 2.0, 1.0], [0.5, 2.0, 1.0])
    np.testing.assert_array_equal(strategy.adam_steps.numpy(), [2.0, 1.0, 1.0])


def test_same_batch_in_a_compiled_step():
    strategy = _build(update="same_batch")

    @tf.function(jit_compile=True)
    def step(before, after):
        _, weights, _ = strategy.combine(before, before, tf.constant([True, True]), 0, strategy.state())
        strategy.commit(strategy.after_step(before, after, tf.constant([True, True]), 0, strategy.state()))
        return weights

    step(tf.constant([1.0, 1.0]), tf.constant([0.5, 1.0]))
    # First Adam step: m_hat / sqrt(v_hat) = sign(g) (up to Adam's epsilon).
    np.testing.assert_allclose(strategy.logits.numpy(), [-0.025, 0.025], rtol=1e-5)


def test_after_step_is_refused_in_previous_batch_mode():
    strategy = _build()
    with pytest.raises(ValueError, match="only used with update='same_batch'"):
        strategy.after_step(tf.ones(2), tf.ones(2), tf.constant([True, True]), 0, strategy.state())


def test_same_batch_round_trip_keeps_the_mode_and_its_state():
    strategy = _build(update="same_batch", learning_rate=0.05)
    _after(strategy, [1.0, 2.0], [0.7, 1.9])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert restored.get_config() == strategy.get_config() and restored.needs_losses_after_step
    restored.set_weights(strategy.get_weights())
    np.testing.assert_array_equal(restored.logits.numpy(), strategy.logits.numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rate": 0.0}, "`learning_rate` must be a finite number > 0"),
        ({"weight_decay": -1.0}, "`weight_decay` must be a finite number >= 0"),
        ({"eps": float("nan")}, "`eps` must be a finite number > 0"),
        ({"eps": True}, "`eps` must be a finite number > 0"),
        ({"optimizer": "rmsprop"}, "`optimizer` must be one of"),
        ({"update": "next_batch"}, "`update` must be one of"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        FAMO(**kwargs)
    assert "Received:" in str(info.value)
