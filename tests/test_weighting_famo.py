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


def _combine(strategy, losses, present=None):
    present = [True] * len(losses) if present is None else present
    return strategy.combine(tf.constant(losses, tf.float32), tf.constant(present), tf.constant(0, tf.int64))


def _famo_weights(xi, losses):
    z = np.exp(xi) / np.exp(xi).sum()
    inverse = z / np.asarray(losses)
    return inverse / inverse.sum()


def test_two_task_sgd_logit_update_by_hand():
    strategy = get("famo", optimizer="sgd", learning_rate=0.1, weight_decay=0.0)
    strategy.build(["a", "b"])
    _combine(strategy, [1.0, 1.0])
    np.testing.assert_array_equal(strategy.logits.numpy(), [0.0, 0.0])  # no previous step yet
    np.testing.assert_allclose(strategy.task_weights.numpy(), [0.5, 0.5])
    losses = tf.Variable([0.5, 1.0])
    with tf.GradientTape() as tape:
        total = strategy.combine(losses, tf.constant([True, True]), 1)
    # delta = log(prev) - log(now) = (ln 2, 0); z = (1/2, 1/2);
    # d_t = z_t (delta_t - z . delta) = (+ln2/4, -ln2/4); xi = -lr * d.
    xi = np.array([-0.1 * LN2 / 4, 0.1 * LN2 / 4])
    np.testing.assert_allclose(strategy.logits.numpy(), xi, rtol=1e-6)
    # Task a improved faster, so it loses weight relative to the loss-only FAMO weights.
    w = _famo_weights(xi, [0.5, 1.0])
    np.testing.assert_allclose(strategy.task_weights.numpy(), w, rtol=1e-6)
    assert w[0] < 2 / 3
    # The gradient is sum_t c_t grad log L_t with c_t = z_t / sum_j (z_j / L_j).
    z = np.exp(xi) / np.exp(xi).sum()
    c = z / np.sum(z / np.array([0.5, 1.0]))
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), c / np.array([0.5, 1.0]), rtol=1e-6)
    np.testing.assert_allclose(float(total), 1 / np.sum(z / np.array([0.5, 1.0])), rtol=1e-6)


def test_weight_decay_pulls_logits_to_zero_sgd():
    strategy = _build(optimizer="sgd", learning_rate=0.1, weight_decay=0.5)
    strategy.logits.assign([1.0, -1.0])
    _combine(strategy, [1.0, 1.0])
    np.testing.assert_allclose(strategy.logits.numpy(), [1.0, -1.0])
    _combine(strategy, [1.0, 1.0])  # delta = 0: only the decay acts
    np.testing.assert_allclose(strategy.logits.numpy(), [1.0 - 0.1 * 0.5, -1.0 + 0.1 * 0.5], rtol=1e-6)


def test_adam_first_step_moves_each_logit_by_the_learning_rate():
    strategy = _build()  # Adam, lr 0.025, weight decay 1e-3
    _combine(strategy, [1.0, 1.0])
    _combine(strategy, [0.5, 1.0])
    # First Adam step: m_hat / sqrt(v_hat) = sign(g) (up to Adam's epsilon).
    np.testing.assert_allclose(strategy.logits.numpy(), [-0.025, 0.025], rtol=1e-5)
    np.testing.assert_allclose(strategy.adam_steps.numpy(), [1.0, 1.0])


def _reference_adam(loss_sequence, lr=0.025, wd=1e-3):
    xi = np.zeros(len(loss_sequence[0]))
    m, v = np.zeros_like(xi), np.zeros_like(xi)
    for k in range(1, len(loss_sequence)):
        delta = np.log(loss_sequence[k - 1]) - np.log(loss_sequence[k])
        z = np.exp(xi) / np.exp(xi).sum()
        g = z * (delta - z @ delta) + wd * xi
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        xi = xi - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
    return xi


def test_adam_matches_a_numpy_reference_over_many_steps():
    rng = np.random.default_rng(0)
    sequence = rng.uniform(0.2, 3.0, size=(12, 3)).astype(np.float32)
    strategy = _build(("a", "b", "c"))
    for losses in sequence:
        _combine(strategy, losses.tolist())
    np.testing.assert_allclose(
        strategy.logits.numpy(), _reference_adam(sequence.astype(np.float64)), rtol=1e-4, atol=1e-6
    )


def test_absent_task_does_not_change_its_state_or_the_others_update():
    three = _build(("a", "b", "c"))
    two = _build(("a", "c"))
    sequence = [[1.0, 2.0, 1.5], [0.8, 0.0, 1.4], [0.5, 0.0, 1.45], [0.45, 0.0, 1.2]]
    for step, losses in enumerate(sequence):
        present = [True, step == 0, True]
        before = {v.name: v.numpy().copy() for v in three.weights}
        _combine(three, losses, present)
        _combine(two, [losses[0], losses[2]])
        if step > 0:
            for name in ("logits", "adam_m", "adam_v", "adam_steps", "previous_losses"):
                assert (
                    three.weights[[v.name for v in three.weights].index(name)].numpy()[1] == before[name][1]
                ), name
            assert three.task_weights.numpy()[1] == 0.0
            np.testing.assert_allclose(
                three.task_weights.numpy()[[0, 2]], two.task_weights.numpy(), rtol=1e-6
            )
        np.testing.assert_allclose(three.logits.numpy()[[0, 2]], two.logits.numpy(), rtol=1e-6)
    # Back after an absence: no update from a stale pair of losses.
    _combine(three, [0.4, 1.0, 1.0])
    assert three.logits.numpy()[1] == 0.0


def test_one_task_and_zero_losses_stay_finite():
    single = _build(("only",))
    for loss in (2.0, 1.0, 0.0, 0.0):
        total = _combine(single, [loss])
        np.testing.assert_allclose(float(total), loss, atol=1e-6)
        np.testing.assert_allclose(single.task_weights.numpy(), [1.0])
    np.testing.assert_allclose(single.logits.numpy(), [0.0])
    pair = _build()
    for losses in ([1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1e-12, 5.0]):
        _combine(pair, losses)
        assert np.isfinite(pair.logits.numpy()).all() and np.isfinite(pair.task_weights.numpy()).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rate": 0.0}, "`learning_rate` must be a finite number > 0"),
        ({"weight_decay": -1.0}, "`weight_decay` must be a finite number >= 0"),
        ({"eps": float("nan")}, "`eps` must be a finite number > 0"),
        ({"optimizer": "rmsprop"}, "`optimizer` must be one of"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        FAMO(**kwargs)
    assert "Received:" in str(info.value)


def test_serialization_round_trip_keeps_state():
    strategy = FAMO(learning_rate=0.05, weight_decay=0.01, optimizer="adam", eps=1e-6)
    strategy.build(["a", "b"])
    for losses in ([1.0, 2.0], [0.7, 1.9], [0.6, 1.5]):
        _combine(strategy, losses)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, FAMO) and restored.get_config() == strategy.get_config()
    restored.set_weights(strategy.get_weights())
    _combine(strategy, [0.5, 1.0])
    _combine(restored, [0.5, 1.0])
    np.testing.assert_allclose(restored.logits.numpy(), strategy.logits.numpy())
    np.testing.assert_allclose(restored.task_weights.numpy(), strategy.task_weights.numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_combine_in_tf_function_matches_eager(jit_compile):
    eager, graph = _build(), _build()
    fn = tf.function(graph.combine, jit_compile=jit_compile)
    for losses in ([1.0, 2.0], [0.7, 1.9], [0.6, 1.5], [0.65, 1.0]):
        _combine(eager, losses)
        fn(tf.constant(losses), tf.constant([True, True]), tf.constant(0, tf.int64))
    np.testing.assert_allclose(graph.logits.numpy(), eager.logits.numpy(), rtol=1e-5)
    np.testing.assert_allclose(graph.task_weights.numpy(), eager.task_weights.numpy(), rtol=1e-5)


def test_non_finite_loss_leaves_the_state_finite():
    strategy = _build()
    _combine(strategy, [1.0, 1.0])
    _combine(strategy, [float("nan"), 0.5])
    _combine(strategy, [float("inf"), 0.4])
    _combine(strategy, [0.9, 0.3])
    for variable in strategy.weights:
        assert np.isfinite(variable.numpy()).all(), variable.name
    np.testing.assert_allclose(strategy.previous_losses.numpy(), [0.9, 0.3], rtol=1e-6)
