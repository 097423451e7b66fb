import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import GradNorm, get


def _step(strategy, G, losses, present=None):
    G = np.asarray(G, np.float32)
    T = len(G)
    if not strategy.built:
        strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    return strategy.weights_from_gram(
        tf.constant(G @ G.T), tf.constant(losses, tf.float32), tf.constant(present), 0
    ).numpy()


def test_weight_update_direction_on_a_hand_case():
    strategy = GradNorm(alpha=1.5, learning_rate=0.1)
    G = np.eye(2)  # equal gradient norms 1
    alpha = _step(strategy, G, [1.0, 1.0])  # records L(0) = [1, 1]; weighted norms equal targets
    np.testing.assert_allclose(alpha, [1.0, 1.0])
    np.testing.assert_allclose(strategy.learned_weights.numpy(), [1.0, 1.0])
    # Task 0 trains slower (loss ratio 1 vs 0.5): r = [4/3, 2/3], targets = [1.54, 0.54] vs norms [1, 1].
    alpha = _step(strategy, G, [1.0, 0.5])
    np.testing.assert_allclose(alpha, [1.0, 1.0])  # the update uses the weights before the step
    np.testing.assert_allclose(strategy.learned_weights.numpy(), [1.1, 0.9], rtol=1e-6)
    np.testing.assert_allclose(_step(strategy, G, [1.0, 0.5]), [1.1, 0.9], rtol=1e-6)


def test_gradient_scaled_by_norms_and_renormalised():
    strategy = GradNorm(alpha=0.0, learning_rate=0.1)
    _step(strategy, [[1.0, 0.0], [0.0, 4.0]], [1.0, 1.0])
    # grad = sign(w n - mean) n / mean(n) = [-0.4, 1.6]; w = [1.04, 0.84] * 2 / 1.88.
    np.testing.assert_allclose(strategy.learned_weights.numpy(), np.array([1.04, 0.84]) * 2 / 1.88, rtol=1e-6)
    assert abs(strategy.learned_weights.numpy().sum() - 2) < 1e-6


def test_balances_gradient_norms_over_steps():
    strategy = GradNorm(alpha=0.0, learning_rate=0.02)
    G = np.array([[1.0, 0.0], [0.0, 3.0]])
    strategy.build(["a", "b"])
    run = tf.function(strategy.weights_from_gram)
    for _ in range(200):
        run(tf.constant(G @ G.T, tf.float32), tf.ones(2), tf.constant([True, True]), 0)
    w = strategy.learned_weights.numpy()
    np.testing.assert_allclose(w[0] * 1.0, w[1] * 3.0, rtol=0.05)
    np.testing.assert_allclose(w.sum(), 2.0, rtol=1e-5)


def test_masked_task_state_is_untouched():
    strategy = GradNorm(learning_rate=0.1)
    alpha = _step(strategy, [[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], [2.0, 0.0, 1.0], [True, False, True])
    assert alpha[1] == 0
    np.testing.assert_allclose(strategy.initial_losses.numpy(), [2.0, 0.0, 1.0])
    np.testing.assert_allclose(strategy.seen.numpy(), [1.0, 0.0, 1.0])
    assert strategy.learned_weights.numpy()[1] == 1.0
    np.testing.assert_allclose(strategy.learned_weights.numpy().sum(), 3.0, rtol=1e-6)
    # The task's first labelled batch sets its initial loss.
    _step(strategy, np.eye(3), [2.0, 0.7, 1.0])
    np.testing.assert_allclose(strategy.initial_losses.numpy(), [2.0, 0.7, 1.0])


@pytest.mark.parametrize(
    "G",
    [
        np.zeros((2, 3)),
        np.array([[1.0, 2.0], [1.0, 2.0]]),
        np.array([[1.0, 2.0], [-1.0, -2.0]]),
        np.ones((1, 2)),
    ],
)
def test_degenerate_inputs(G):
    strategy = GradNorm()
    for losses in ([1.0] * len(G), [0.0] * len(G)):
        alpha = _step(strategy, G, losses)
        assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(strategy.learned_weights.numpy()))
    np.testing.assert_allclose(strategy.learned_weights.numpy().sum(), len(G), rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit(jit_compile):
    strategy = GradNorm(learning_rate=0.1)
    strategy.build(["a", "b"])
    run = tf.function(
        lambda g, losses: strategy.combine_gradients([g], losses, tf.constant([True, True]), 0)[0],
        jit_compile=jit_compile,
    )
    G = tf.constant([[1.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(run(G, tf.ones(2)).numpy(), [1.0, 4.0])
    np.testing.assert_allclose(run(G, tf.ones(2)).numpy(), np.array([1.04, 3.36]) * 2 / 1.88, rtol=1e-6)


def test_serialization_round_trip_keeps_state():
    strategy = get("gradnorm", alpha=0.5, learning_rate=0.01, update_every=2)
    strategy.build(["a", "b"])
    strategy.learned_weights.assign([1.5, 0.5])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, GradNorm) and restored.get_config() == strategy.get_config()
    assert restored.level == "gradient" and restored.gram_based
    restored.set_weights(strategy.get_weights())
    np.testing.assert_allclose(restored.learned_weights.numpy(), [1.5, 0.5])


@pytest.mark.parametrize("kwargs", [{"alpha": -1.0}, {"learning_rate": 0.0}, {"learning_rate": "0.1"}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        GradNorm(**kwargs)
