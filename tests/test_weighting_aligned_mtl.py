import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import AlignedMTL, get


def _alpha(G, present=None):
    G = np.asarray(G, np.float64)
    T = len(G)
    strategy = AlignedMTL()
    strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    return strategy.weights_from_gram(
        tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), 0
    ).numpy()


def test_orthogonal_gradients_are_rescaled_to_the_smallest_norm():
    Q = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))[0][:3]
    norms = np.array([3.0, 0.5, 2.0])
    G = Q * norms[:, None]
    alpha = _alpha(G)
    np.testing.assert_allclose(alpha, 0.5 / norms, rtol=1e-10)
    np.testing.assert_allclose(alpha @ G, 0.5 * Q.sum(0), atol=1e-12)


def test_aligned_gradients_have_equal_singular_values():
    rng = np.random.default_rng(1)
    G = rng.normal(size=(3, 6))
    G[2] = -G[0] + 0.2 * G[2]
    K = G @ G.T
    s, V = np.linalg.eigh(K)
    B = np.sqrt(s.min()) * V @ np.diag(s**-0.5) @ V.T
    aligned = B @ G
    np.testing.assert_allclose(np.linalg.svd(aligned, compute_uv=False), np.sqrt(s.min()), rtol=1e-8)
    np.testing.assert_allclose(_alpha(G), B.sum(0), rtol=1e-8)


def test_masked_and_one_task():
    G = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(_alpha(G, [True, False, True]), [0.25, 0.0, 1.0], rtol=1e-10)
    np.testing.assert_allclose(AlignedMTL().aggregate(np.array([[3.0, 4.0]])).numpy(), [3.0, 4.0])


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([2.0, 4.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
    ],
)
def test_degenerate_inputs(G, expected):
    strategy = AlignedMTL()
    np.testing.assert_allclose(strategy.aggregate(G.astype("float32")).numpy(), expected, atol=1e-5)
    assert np.all(np.isfinite(strategy.task_weights.numpy()))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit(jit_compile):
    strategy = AlignedMTL()
    strategy.build(["a", "b", "c"])
    G = np.random.default_rng(2).normal(size=(3, 8)).astype("float32")

    @tf.function(jit_compile=jit_compile)
    def run(g):
        return strategy.combine_gradients([g], tf.ones(3), tf.constant([True, True, True]), 0)[0]

    np.testing.assert_allclose(run(tf.constant(G)).numpy(), _alpha(G) @ G.astype(np.float64), atol=1e-5)


def test_serialization_round_trip():
    strategy = get("aligned_mtl", mode="representation")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, AlignedMTL) and restored.get_config() == strategy.get_config()
