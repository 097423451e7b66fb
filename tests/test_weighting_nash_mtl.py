import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import NashMTL, get


def _alpha(G, present=None, **kwargs):
    G = np.asarray(G, np.float64)
    T = len(G)
    strategy = NashMTL(**kwargs)
    strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    run = tf.function(strategy.weights_from_gram)
    return run(tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), 0).numpy()


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
def test_alpha_solves_the_bargaining_equations(num_tasks):
    rng = np.random.default_rng(num_tasks)
    for _ in range(4):
        G = rng.normal(size=(num_tasks, 12)) * rng.uniform(0.01, 100, size=(num_tasks, 1))
        alpha = _alpha(G, ridge=1e-12)
        K = G @ G.T
        assert np.all(alpha > 0)
        np.testing.assert_allclose(K @ alpha, 1.0 / alpha, rtol=1e-7)
        d = alpha @ G
        np.testing.assert_allclose(d @ d, num_tasks, rtol=1e-7)


def test_orthogonal_gradients_get_inverse_norms():
    np.testing.assert_allclose(_alpha([[2.0, 0.0], [0.0, 0.5]]), [0.5, 2.0], rtol=1e-7)


def test_masked_and_one_task():
    G = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    alpha = _alpha(G, [True, False, True], ridge=1e-12)
    assert alpha[1] == 0
    sub = G[[0, 2]]
    np.testing.assert_allclose(sub @ sub.T @ alpha[[0, 2]], 1.0 / alpha[[0, 2]], rtol=1e-7)
    np.testing.assert_allclose(NashMTL().aggregate(np.array([[3.0, 4.0]])).numpy(), [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.sqrt(2) * np.array([1.0, 2.0]) / np.sqrt(5)),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
    ],
)
def test_degenerate_inputs(G, expected):
    strategy = NashMTL()
    np.testing.assert_allclose(strategy.aggregate(G).numpy(), expected, atol=1e-6)
    assert np.all(np.isfinite(strategy.task_weights.numpy()))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit(jit_compile):
    strategy = NashMTL()
    strategy.build(["a", "b", "c"])
    G = np.random.default_rng(5).normal(size=(3, 7)).astype("float32")

    @tf.function(jit_compile=jit_compile)
    def run(g):
        return strategy.combine_gradients([g], tf.ones(3), tf.constant([True, True, True]), 0)[0]

    run(tf.constant(G))
    alpha = strategy.task_weights.numpy().astype(np.float64)
    K = G.astype(np.float64) @ G.T.astype(np.float64)
    np.testing.assert_allclose(K @ alpha, 1.0 / alpha, rtol=1e-4)


def test_serialization_round_trip():
    strategy = get("nash_mtl", max_iter=20, ridge=1e-6, update_every=25)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, NashMTL) and restored.get_config() == strategy.get_config()
    assert restored.update_every == 25


@pytest.mark.parametrize("kwargs", [{"max_iter": 0}, {"ridge": 0.0}, {"ridge": 1.0}, {"ridge": "1e-8"}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        NashMTL(**kwargs)
