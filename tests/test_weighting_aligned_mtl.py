import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import AlignedMTL


def _alpha(G, present=None):
    G = np.asarray(G, np.float64)
    T = len(G)
    strategy = AlignedMTL()
    strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    alpha, new_state = strategy.weights_from_gram(
        tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), tf.constant(0), strategy.state()
    )
    assert new_state == {}
    return alpha.numpy()


def test_orthogonal_gradients_are_rescaled_to_the_smallest_norm():
    Q = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))[0][:3]
    for norms in (np.array([3.0, 0.5, 2.0]), np.array([1e3, 1e-3, 1.0])):
        G = Q * norms[:, None]
        alpha = _alpha(G)
        np.testing.assert_allclose(alpha, norms.min() / norms, rtol=1e-10)
        np.testing.assert_allclose(alpha @ G, norms.min() * Q.sum(0), atol=1e-12 * norms.max())


def test_aligned_gradients_have_equal_singular_values():
    rng = np.random.default_rng(1)
    G = rng.normal(size=(3, 6))
    G[2] = -G[0] + 0.2 * G[2]
    s, V = np.linalg.eigh(G @ G.T)
    B = np.sqrt(s.min()) * V @ np.diag(s**-0.5) @ V.T
    np.testing.assert_allclose(np.linalg.svd(B @ G, compute_uv=False), np.sqrt(s.min()), rtol=1e-8)
    np.testing.assert_allclose(_alpha(G), B.sum(0), rtol=1e-10)


def test_more_tasks_than_rank_uses_the_smallest_non_zero_singular_value():
    # Rank 2: B = sigma_2 V_2 S_2^-1/2 V_2^T on the range of K.
    G = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s, V = np.linalg.eigh(G @ G.T)
    V, s = V[:, 1:], s[1:]  # drop the zero eigenvalue
    np.testing.assert_allclose(
        _alpha(G), np.sqrt(s.min()) * V @ np.diag(s**-0.5) @ V.T @ np.ones(3), rtol=1e-10
    )


def test_masked_and_one_task():
    G = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(_alpha(G, [True, False, True]), [0.25, 0.0, 1.0], rtol=1e-10)
    np.testing.assert_allclose(_alpha(G), [0.25, 0.0, 1.0], rtol=1e-10)  # a zero gradient: weight 0
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
    np.testing.assert_allclose(AlignedMTL().aggregate(G.astype("float32")).numpy(), expected, atol=1e-5)
