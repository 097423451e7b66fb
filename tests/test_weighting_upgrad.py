import keras
import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from kmtl.weighting import UPGrad, get


def _alpha(G, present=None, **kwargs):
    G = np.asarray(G, np.float64)
    T = len(G)
    strategy = UPGrad(**kwargs)
    strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    run = tf.function(strategy.weights_from_gram)
    return run(tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), 0).numpy()


def _projection_onto_dual_cone(G, g):
    lam = scipy.optimize.nnls(G.T, -g)[0]
    return g + lam @ G


@pytest.mark.parametrize("num_tasks", [2, 3, 6])
@pytest.mark.parametrize("max_exact_tasks", [10, 0])
def test_non_conflict_on_random_conflicting_cases(num_tasks, max_exact_tasks):
    rng = np.random.default_rng(num_tasks)
    for _ in range(5):
        G = rng.normal(size=(num_tasks, 10))
        G[1] = -G[0] + 0.3 * G[1]  # a strong conflict
        d = _alpha(G, max_exact_tasks=max_exact_tasks) @ G
        assert np.all(G @ d >= -1e-9 * np.linalg.norm(G) ** 2)
        expected = np.mean([_projection_onto_dual_cone(G, g) for g in G], axis=0)
        np.testing.assert_allclose(d, expected, atol=1e-8)


def test_hand_case_and_no_conflict_is_the_mean():
    # g1 = [1, 0] projects to [0.5, 0.5]; g2 = [-1, 1] projects to [0, 1].
    np.testing.assert_allclose(UPGrad().aggregate(np.array([[1.0, 0.0], [-1.0, 1.0]])).numpy(), [0.25, 0.75])
    G = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]])
    np.testing.assert_allclose(UPGrad().aggregate(G).numpy(), G.mean(0), atol=1e-12)


def test_masked_and_one_task():
    G = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(_alpha(G, [True, False, True]) @ G, [0.25, 0.75], atol=1e-12)
    assert _alpha(G, [True, False, True])[1] == 0
    np.testing.assert_allclose(UPGrad().aggregate(np.array([[2.0, -1.0]])).numpy(), [2.0, -1.0])


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([1.0, 2.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([0.5, 1.0])),
    ],
)
def test_degenerate_inputs(G, expected):
    np.testing.assert_allclose(UPGrad().aggregate(G).numpy(), expected, atol=1e-9)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit(jit_compile):
    strategy = UPGrad()
    strategy.build([f"t{i}" for i in range(4)])
    G = np.random.default_rng(2).normal(size=(4, 9)).astype("float32")
    G[3] = -G[0]

    @tf.function(jit_compile=jit_compile)
    def run(g):
        return strategy.combine_gradients([g], tf.ones(4), tf.constant([True] * 4), 0)[0]

    d = run(tf.constant(G)).numpy()
    assert np.all(G @ d >= -1e-4)


def test_serialization_round_trip():
    strategy = get("upgrad", max_exact_tasks=4)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, UPGrad) and restored.get_config() == strategy.get_config()


@pytest.mark.parametrize("value", [-1, 15, 2.0, True])
def test_rejects_bad_arguments(value):
    with pytest.raises(ValueError, match="Received: max_exact_tasks="):
        UPGrad(max_exact_tasks=value)
