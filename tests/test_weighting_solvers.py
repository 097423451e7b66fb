import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from kmtl.weighting import _solvers

# Graph mode: eager while loops dispatch every iteration from Python.
_nonnegative_qp = tf.function(_solvers.nonnegative_qp)
_min_norm = tf.function(_solvers.min_norm_weights)
_eigh = tf.function(_solvers.symmetric_eigh)


def _nnls_reference(G):
    # min_{l >= 0} 1/2 l^T K l + l^T K e_i  ==  min_{l >= 0} |G^T l + g_i|^2 / 2.
    return np.stack([scipy.optimize.nnls(G.T, -G[i])[0] for i in range(len(G))], axis=1)


@pytest.mark.parametrize("max_exact_tasks", [10, 0])
@pytest.mark.parametrize("num_tasks", [2, 5, 8])
def test_nonnegative_qp_matches_scipy_nnls(num_tasks, max_exact_tasks):
    rng = np.random.default_rng(10 + num_tasks)
    G = rng.normal(size=(num_tasks, 12))
    G[1] = -G[0] + 0.2 * G[1]
    K = G @ G.T
    lam = _nonnegative_qp(
        tf.constant(K), tf.constant(K), tf.constant([True] * num_tasks), max_exact_tasks=max_exact_tasks
    ).numpy()
    np.testing.assert_allclose(lam, _nnls_reference(G), atol=1e-9)


@pytest.mark.parametrize("max_exact_tasks", [10, 0])
def test_nonnegative_qp_singular_masked_and_rescaled(max_exact_tasks):
    G = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [-3.0, 1.0]])
    K = G @ G.T
    present = tf.constant([True, True, True, False])
    C = K * [1.0, 1.0, 1.0, 0.0]  # the absent task's problem is empty too
    lam = _nonnegative_qp(tf.constant(K), tf.constant(C), present, max_exact_tasks=max_exact_tasks).numpy()
    # Identical rows never conflict, a zero row adds nothing, the absent row is ignored.
    np.testing.assert_allclose(lam, np.zeros((4, 4)), atol=1e-12)
    # Rescaling a coordinate rescales its solution (the solver works on unit-norm columns).
    H = np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.5, -2.0, 1.0]])
    scales = np.array([1e-3, 1.0, 1e3])
    lam = _nonnegative_qp(tf.constant(H @ H.T), tf.constant(H @ H.T), tf.constant([True] * 3)).numpy()
    Hs = H * scales[:, None]
    lam_s = _nonnegative_qp(tf.constant(Hs @ Hs.T), tf.constant(Hs @ Hs.T), tf.constant([True] * 3)).numpy()
    np.testing.assert_allclose(lam_s * scales[:, None] / scales[None, :], lam, rtol=1e-10, atol=1e-14)


def test_two_task_min_norm_is_the_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(10):
        g1, g2 = rng.normal(size=(2, 6)) * rng.uniform(0.01, 100, size=(2, 1))
        K = np.array([[g1 @ g1, g1 @ g2], [g1 @ g2, g2 @ g2]])
        w = _min_norm(tf.constant(K), tf.constant([True, True])).numpy()
        expected = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
        np.testing.assert_allclose(w, [expected, 1 - expected], atol=1e-12)


@pytest.mark.parametrize("max_exact_tasks", [10, 0])
def test_min_norm_kkt_masked_and_zero_gradient(max_exact_tasks):
    rng = np.random.default_rng(3)
    G = rng.normal(size=(6, 9))
    G[0] -= 1.5 * G[1]
    w = _min_norm(tf.constant(G @ G.T), tf.constant([True] * 6), max_exact_tasks=max_exact_tasks).numpy()
    d = w @ G
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
    # KKT: every task is at least as steep as the solution, equally steep on the support.
    assert np.min(G @ d) >= d @ d * (1 - 1e-10)
    np.testing.assert_allclose((G @ d)[w > 1e-9], d @ d, rtol=1e-9)
    H = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    w = _min_norm(tf.constant(H @ H.T), tf.constant([True, False, True]), max_exact_tasks=max_exact_tasks)
    np.testing.assert_allclose(w.numpy(), [0.8, 0.0, 0.2], atol=1e-12)
    # A zero gradient makes the min-norm point 0: it takes all the weight.
    w = _min_norm(tf.constant(H @ H.T), tf.constant([True] * 3), max_exact_tasks=max_exact_tasks)
    np.testing.assert_allclose(w.numpy(), [0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(_min_norm(tf.zeros((2, 2)), tf.constant([True, True])).numpy(), [0.5, 0.5])


def test_normalized_gram_and_unit_diagonal():
    K = np.array([[4.0, 1.0, 3.0], [1.0, 2.0, 5.0], [3.0, 5.0, 9.0]])
    Kn, scale = _solvers.normalized_gram(tf.constant(K), tf.constant([True, True, False]))
    assert float(scale) == 3.0
    np.testing.assert_allclose(Kn.numpy(), np.array([[4, 1, 0], [1, 2, 0], [0, 0, 0]]) / 3.0)
    _, zero_scale = _solvers.normalized_gram(tf.zeros((2, 2)), tf.constant([True, True]))
    assert float(zero_scale) == 1.0
    K = np.diag([4.0, 0.0, 1e-20, 9.0])
    K[0, 3] = K[3, 0] = 3.0
    Kn, inverse, valid = _solvers.unit_diagonal(tf.constant(K), tf.constant([True, True, True, False]))
    np.testing.assert_array_equal(valid.numpy(), [True, False, True, False])
    np.testing.assert_allclose(inverse.numpy(), [0.5, 0.0, 1e10, 0.0])
    np.testing.assert_allclose(Kn.numpy(), np.diag([1.0, 0.0, 1.0, 0.0]))


@pytest.mark.parametrize("num_tasks", [1, 4, 7])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_symmetric_eigh_is_precise_with_and_without_xla(num_tasks, jit_compile):
    rng = np.random.default_rng(num_tasks)
    G = rng.normal(size=(num_tasks, 6)) * 10.0 ** rng.uniform(-3, 3, size=(num_tasks, 1))
    fn = tf.function(_solvers.symmetric_eigh, jit_compile=jit_compile)
    for K in (G @ G.T, np.zeros((num_tasks, num_tasks)), np.ones((num_tasks, num_tasks))):
        values, vectors = (t.numpy() for t in fn(tf.constant(K)))
        scale = max(np.abs(K).max(), 1e-300)
        np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, K, atol=1e-14 * scale)
        np.testing.assert_allclose(vectors.T @ vectors, np.eye(num_tasks), atol=1e-14)
    # Graded matrix (norms over 6 orders of magnitude): small eigenvalues to a relative 1e-10.
    values = np.sort(fn(tf.constant(G @ G.T))[0].numpy())[::-1]
    reference = np.concatenate([np.linalg.svd(G, compute_uv=False) ** 2, np.zeros(num_tasks)])[:num_tasks]
    np.testing.assert_allclose(values[:6], reference[:6], rtol=1e-10)


def test_support_solve_keeps_singular_systems_finite():
    Q = np.array([[1.0, 1.0], [1.0, 1.0]])  # exactly singular (two identical unit gradients)
    supports = tf.constant([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], tf.float64)
    z = _solvers.support_solve(tf.constant(Q), tf.ones((1, 2, 1), tf.float64), supports).numpy()[:, :, 0]
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z[0].sum(), 1.0, rtol=1e-9)  # a solution of the consistent system
    np.testing.assert_allclose(z[1:], [[1.0, 0.0], [0.0, 0.0]], atol=1e-12)


def test_frank_wolfe_minimises_a_quadratic_on_the_simplex():
    rng = np.random.default_rng(1)
    G = rng.normal(size=(4, 7))
    K = tf.constant(G @ G.T)

    def step(w, d, gamma_max):
        kd = tf.linalg.matvec(K, d)
        gamma = -tf.tensordot(w, kd, 1) / tf.tensordot(d, kd, 1)
        return tf.clip_by_value(gamma, 0.0, gamma_max)

    run = tf.function(
        lambda: _solvers.frank_wolfe(
            lambda w: 2.0 * tf.linalg.matvec(K, w), step, tf.ones(4, bool), 2000, 1e-12
        )
    )
    np.testing.assert_allclose(run().numpy(), _min_norm(K, tf.ones(4, bool)).numpy(), atol=1e-6)
