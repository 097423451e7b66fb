import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from kmtl.weighting import _solvers

# Graph mode: eager while loops dispatch every iteration from Python.
_min_norm = tf.function(_solvers.min_norm_weights)
_nonnegative_qp = tf.function(_solvers.nonnegative_qp)


def _simplex_min(K):
    T = len(K)
    best = None
    for x0 in [np.ones(T) / T] + [np.eye(T)[i] for i in range(T)]:
        res = scipy.optimize.minimize(
            lambda x: x @ K @ x,
            x0,
            jac=lambda x: 2 * K @ x,
            bounds=[(0, 1)] * T,
            constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best


def test_two_task_min_norm_is_the_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(20):
        g1, g2 = rng.normal(size=(2, 6))
        K = np.array([[g1 @ g1, g1 @ g2], [g1 @ g2, g2 @ g2]])
        w = _min_norm(tf.constant(K), tf.constant([True, True])).numpy()
        expected = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
        np.testing.assert_allclose(w, [expected, 1 - expected], atol=1e-12)


@pytest.mark.parametrize("num_tasks", [3, 4, 7])
def test_frank_wolfe_min_norm_matches_scipy(num_tasks):
    rng = np.random.default_rng(num_tasks)
    for _ in range(4):
        G = rng.normal(size=(num_tasks, 9))
        G[0] -= 1.5 * G[1]
        K = G @ G.T
        w = _min_norm(tf.constant(K), tf.constant([True] * num_tasks)).numpy()
        ref = _simplex_min(K)
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
        assert w @ K @ w <= ref.fun + 1e-10 * np.trace(K)
        # KKT: every vertex is at least as steep as the solution.
        assert np.min(K @ w) >= w @ K @ w - 1e-9 * np.trace(K)


def test_min_norm_masked_task_is_excluded():
    G = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    K = G @ G.T
    w = _min_norm(tf.constant(K), tf.constant([True, False, True])).numpy()
    np.testing.assert_allclose(w, [0.8, 0.0, 0.2], atol=1e-9)
    w2 = _min_norm(tf.constant(K[:2, :2]), tf.constant([True, False])).numpy()
    np.testing.assert_allclose(w2, [1.0, 0.0])


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
    # min_{l >= 0} 1/2 l^T K l + l^T K e_i  ==  min_{l >= 0} |G^T l + g_i|^2 / 2.
    ref = np.stack([scipy.optimize.nnls(G.T, -G[i])[0] for i in range(num_tasks)], axis=1)
    np.testing.assert_allclose(lam, ref, atol=1e-9)


def test_nonnegative_qp_singular_and_masked():
    G = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
    K = G @ G.T
    lam = _nonnegative_qp(tf.constant(K), tf.constant(K), tf.constant([True, True, False])).numpy()
    np.testing.assert_allclose(lam, np.zeros((3, 3)), atol=1e-12)


def test_normalized_gram_masks_and_scales():
    K = np.array([[4.0, 1.0, 3.0], [1.0, 2.0, 5.0], [3.0, 5.0, 9.0]])
    Kn, scale = _solvers.normalized_gram(tf.constant(K), tf.constant([True, True, False]))
    assert float(scale) == 3.0
    np.testing.assert_allclose(Kn.numpy(), np.array([[4, 1, 0], [1, 2, 0], [0, 0, 0]]) / 3.0)
    _, zero_scale = _solvers.normalized_gram(tf.zeros((2, 2)), tf.constant([True, True]))
    assert float(zero_scale) == 1.0


def test_random_numbers_are_reproducible_uniform_and_equal_under_xla():
    draws = tf.Variable(0, dtype=tf.int64)
    key = _solvers.next_key(123, draws)
    assert int(draws.numpy()) == 1
    values = _solvers.uniform(key, (20000,)).numpy()
    assert 0 <= values.min() and values.max() < 1 and abs(values.mean() - 0.5) < 0.01
    again = _solvers.uniform(_solvers.next_key(123, tf.Variable(0, dtype=tf.int64)), (20000,)).numpy()
    np.testing.assert_array_equal(values, again)
    other = _solvers.uniform(key, (20000,), stream=1).numpy()
    assert np.abs(values - other).max() > 0.5
    jit = tf.function(lambda k: _solvers.uniform(k, (20000,)), jit_compile=True)(key).numpy()
    np.testing.assert_array_equal(values, jit)
    orders = _solvers.random_orders(key, 5).numpy()
    assert all(sorted(row) == list(range(5)) for row in orders)


@pytest.mark.parametrize("seed", [-1, 2**63, 0.5, "1", True])
def test_check_seed_rejects(seed):
    with pytest.raises(ValueError, match="Received: seed="):
        _solvers.check_seed(seed)
