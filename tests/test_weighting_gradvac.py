import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import GradVac, get


def _built(tasks=2, **kwargs):
    strategy = GradVac(seed=kwargs.pop("seed", 0), **kwargs)
    strategy.build([f"t{i}" for i in range(tasks)])
    return strategy


def _run(strategy, G, present=None):
    G = np.asarray(G, np.float64)
    T = len(G)
    present = [True] * T if present is None else present
    out = strategy.combine_gradients([tf.constant(G)], tf.ones(T, tf.float64), tf.constant(present), 0)
    return out[0].numpy()


def test_hand_case_reaches_the_target_similarity():
    strategy = _built(beta=0.5)
    strategy.targets.assign([[0.0, 0.5], [0.5, 0.0]])
    g1, g2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # cos = 0 < target 0.5
    d = _run(strategy, [g1, g2])
    # g1' = g1 + |g1| (0.5 * 1 - 0) / (|g2| sqrt(0.75)) g2 = [1, 1/sqrt(3)], symmetric for g2.
    np.testing.assert_allclose(d, [1 + 1 / np.sqrt(3), 1 + 1 / np.sqrt(3)], atol=1e-12)
    g1p = np.array([1.0, 1 / np.sqrt(3)])
    np.testing.assert_allclose(g1p @ g2 / np.linalg.norm(g1p), 0.5)
    # EMA of the observed cosine (0): 0.5 * 0.5 + 0.5 * 0.
    np.testing.assert_allclose(strategy.targets.numpy(), [[0.0, 0.25], [0.25, 0.0]])


def test_zero_targets_reduce_to_pcgrad_on_conflicts():
    strategy = _built(beta=0.01)
    np.testing.assert_allclose(_run(strategy, [[1.0, 0.0], [-1.0, 1.0]]), [0.5, 1.5], atol=1e-12)
    c = -1 / np.sqrt(2)
    np.testing.assert_allclose(strategy.targets.numpy(), 0.01 * c * (1 - np.eye(2)), rtol=1e-6)


def test_similarity_above_target_is_left_alone():
    strategy = _built()
    G = np.array([[1.0, 0.2], [0.8, 1.0]])
    np.testing.assert_allclose(_run(strategy, G), G.sum(0), atol=1e-12)


def test_masked_task_keeps_its_targets():
    strategy = _built(tasks=3)
    strategy.targets.assign(np.full((3, 3), 0.3) * (1 - np.eye(3)))
    G = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    _run(strategy, G, [True, False, True])
    targets = strategy.targets.numpy()
    np.testing.assert_allclose(targets[1], [0.3, 0.0, 0.3], rtol=1e-6)
    np.testing.assert_allclose(targets[:, 1], [0.3, 0.0, 0.3], rtol=1e-6)
    assert strategy.task_weights.numpy()[1] == 0
    np.testing.assert_allclose(targets[0, 2], 0.99 * 0.3, rtol=1e-6)


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([2.0, 4.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        (np.array([[3.0, -1.0]]), np.array([3.0, -1.0])),
    ],
)
def test_degenerate_inputs(G, expected):
    strategy = _built(tasks=len(G))
    np.testing.assert_allclose(_run(strategy, G), expected, atol=1e-9)
    assert np.all(np.isfinite(strategy.targets.numpy()))


def test_state_is_stable_over_many_steps():
    strategy = _built(tasks=3, beta=0.2, seed=4)
    rng = np.random.default_rng(0)
    run = tf.function(lambda g: strategy.combine_gradients([g], tf.ones(3), tf.constant([True] * 3), 0)[0])
    for _ in range(50):
        G = rng.normal(size=(3, 6)).astype("float32")
        G[1] = -G[0] + 0.1 * G[1]
        assert np.all(np.isfinite(run(tf.constant(G)).numpy()))
    targets = strategy.targets.numpy()
    assert np.all(np.abs(targets) <= 1) and targets[0, 1] < -0.5
    assert int(strategy.draws.numpy()) == 50


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit_match_eager(jit_compile):
    G = np.random.default_rng(1).normal(size=(3, 5))
    G[2] = -G[0]
    eager = _built(tasks=3, seed=9)
    expected = _run(eager, G)
    strategy = _built(tasks=3, seed=9)
    run = tf.function(
        lambda g: strategy.combine_gradients([g], tf.ones(3, tf.float64), tf.constant([True] * 3), 0)[0],
        jit_compile=jit_compile,
    )
    np.testing.assert_allclose(run(tf.constant(G)).numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(strategy.targets.numpy(), eager.targets.numpy(), atol=1e-7)


def test_serialization_round_trip_keeps_targets():
    strategy = get("gradvac", beta=0.05, seed=3)
    strategy.build(["a", "b"])
    strategy.targets.assign([[0.0, 0.4], [0.2, 0.0]])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, GradVac) and restored.get_config() == strategy.get_config()
    restored.set_weights(strategy.get_weights())
    np.testing.assert_allclose(restored.targets.numpy(), [[0.0, 0.4], [0.2, 0.0]])


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"beta": 1.5}, {"seed": -2}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        GradVac(**kwargs)
