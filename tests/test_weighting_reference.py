"""The Gram-based strategies against exact references computed here, in float64.

References use numpy closed forms and scipy solvers only (never kmtl's
solvers), on matrix classes that stress the numerics: Gaussian, task norms
spanning 1e-3..1e3 (log-uniform), more tasks than the gradients' rank
(10 x 7, 6 x 3), near-parallel rows, exactly opposite rows and strongly
conflicting rows, three seeds each. Every check reports its relative error
in the assertion message. Each case also checks the method's defining
property, scale invariance (`G * 1e-4`, `G * 1e4`) and the same cases
under `tf.function(jit_compile=True)`. Every strategy is built for 10 tasks
(one trace); 6-task cases mark the other 4 absent, which also checks that
absent tasks get weight 0 and take no part.
"""

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf
from _weighting_helpers import pcgrad_reference

import kmtl
from kmtl.weighting import _random

SEEDS = (0, 1, 2)
KINDS = ("gaussian", "norms", "wide10x7", "wide6x3", "parallel", "opposite", "conflicting", "conflicting10x7")
#: Classes whose gradients are linearly independent (rank = number of tasks).
FULL_RANK = ("gaussian", "norms", "parallel", "conflicting")


def _matrix(kind, seed):
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    if kind == "gaussian":
        return rng.normal(size=(6, 12))
    if kind == "norms":
        directions = rng.normal(size=(6, 12))
        exponents = np.concatenate([[-3.0, 3.0], rng.uniform(-3, 3, 4)])
        rng.shuffle(exponents)
        return directions / np.linalg.norm(directions, axis=1, keepdims=True) * 10.0 ** exponents[:, None]
    if kind in ("wide10x7", "wide6x3"):
        return rng.normal(size=(10, 7) if kind == "wide10x7" else (6, 3))
    if kind == "parallel":
        base = rng.normal(size=8)
        return rng.uniform(0.5, 2.0, (6, 1)) * (base + 1e-4 * rng.normal(size=(6, 8)))
    if kind == "opposite":
        G = rng.normal(size=(6, 8))
        G[1] = -2.0 * G[0]
        return G
    Z = rng.normal(size=(10, 7) if kind == "conflicting10x7" else (6, 12))
    return Z - 0.9 * Z.mean(0)  # every pair conflicts on average


# --- references (numpy / scipy only) -------------------------------------------
def _nnls(A, b):
    """`argmin_{x >= 0} |A x - b|` (scipy), solved with unit columns (an exact change of variables)."""
    norms = np.linalg.norm(A, axis=0)
    x = np.zeros(A.shape[1])
    nonzero = norms > 0
    x[nonzero] = scipy.optimize.nnls(A[:, nonzero] / norms[nonzero], b, maxiter=100 * A.shape[1])[0]
    return x / np.where(nonzero, norms, 1.0)


def _upgrad(G):
    # Projection of g_i onto {x : G x >= 0} is g_i + G^T l, l = argmin_{l >= 0} |G^T l + g_i|.
    T = len(G)
    return np.mean([np.eye(T)[i] + _nnls(G.T, -G[i]) for i in range(T)], axis=0)


def _mgda(G):
    # min_{w in simplex} |G^T w|^2: l = argmin_{l >= 0} |G^T l|^2 + s (1^T l - 1)^2 gives w = l / sum(l).
    s = np.sqrt(np.min(np.sum(G * G, axis=1)))
    A = np.vstack([G.T, s * np.ones(len(G))])
    lam = _nnls(A, np.concatenate([np.zeros(G.shape[1]), [s]]))
    return lam / lam.sum()


def _nash(G, ridge):
    # (K + ridge diag(K)) alpha = 1 / alpha, i.e. (K_n + ridge I) beta = 1 / beta with beta = |g| alpha:
    # the minimiser of the convex 1/2 b^T A b - sum log b (scipy trust-exact), polished by scipy's root.
    norms = np.linalg.norm(G, axis=1)
    A = (G / norms[:, None]) @ (G / norms[:, None]).T + ridge * np.eye(len(G))
    residual = lambda b: A @ b - 1.0 / b  # noqa: E731
    jacobian = lambda b: A + np.diag(1.0 / b**2)  # noqa: E731
    minimum = scipy.optimize.minimize(
        lambda b: 0.5 * b @ A @ b - np.sum(np.log(b)) if np.all(b > 0) else np.inf,
        np.ones(len(G)),
        jac=residual,
        hess=jacobian,
        method="trust-exact",
        options={"gtol": 1e-12, "maxiter": 1000},
    )
    root = scipy.optimize.root(residual, minimum.x, jac=jacobian, method="hybr")
    candidates = [b for b in (minimum.x, root.x) if np.all(b > 0)]
    beta = min(candidates, key=lambda b: np.abs(residual(b) * b).max())
    assert np.abs(residual(beta) * beta).max() < 1e-5, "no reference solution"
    return beta / norms


def _imtl(G):
    # Least squares of u_t . d = 1 (exact when rank = T): d = U^+ 1 = G^T N^-1 (U U^T)^+ 1.
    norms = np.linalg.norm(G, axis=1)
    W, s, _ = np.linalg.svd(G / norms[:, None], full_matrices=False)
    keep = s > s.max() * max(G.shape) * np.finfo(float).eps
    beta = W[:, keep] @ ((W[:, keep].T @ np.ones(len(G))) / s[keep] ** 2) / norms
    return beta / beta.sum()


def _imtl_paper(G):
    # The paper's closed form: alpha_{2:T} = g_1 U^T (D U^T)^-1.
    units = G / np.linalg.norm(G, axis=1, keepdims=True)
    D, U = G[0] - G[1:], units[0] - units[1:]
    rest = G[0] @ U.T @ np.linalg.inv(D @ U.T)
    return np.concatenate([[1.0 - rest.sum()], rest])


def _aligned(G):
    V, s, _ = np.linalg.svd(G, full_matrices=False)
    keep = s > s.max() * max(G.shape) * np.finfo(float).eps
    V, s = V[:, keep], s[keep]
    return s.min() * V @ ((V.T @ np.ones(len(G))) / s)


_CAGRAD = {}


def _cagrad_update(G, c):
    """The primal, max_d min_t g_t . d s.t. |d - g_0| <= c |g_0|, by SLSQP from several starts."""
    key = (G.tobytes(), c)
    if key not in _CAGRAD:
        _CAGRAD[key] = _cagrad_primal(G, c)
    return _CAGRAD[key]


def _cagrad_primal(G, c):
    T, dim = G.shape
    g0 = G.mean(0)
    radius = c * np.linalg.norm(g0)
    # Variables x = (z, t), d = g_0 + radius z: maximise t s.t. G d >= t and |z| <= 1.
    improvement = {
        "type": "ineq",
        "fun": lambda x: G @ (g0 + radius * x[:-1]) - x[-1],
        "jac": lambda x: np.hstack([radius * G, -np.ones((T, 1))]),
    }
    ball = {
        "type": "ineq",
        "fun": lambda x: 1.0 - x[:-1] @ x[:-1],
        "jac": lambda x: np.concatenate([-2.0 * x[:-1], [0.0]])[None],
    }
    best = None
    smallest = G[np.argmin(np.linalg.norm(G, axis=1))]
    starts = [np.zeros(dim), g0 / np.linalg.norm(g0), -smallest / np.linalg.norm(smallest)]
    for z in starts:
        x0 = np.concatenate([z, [np.min(G @ (g0 + radius * z))]])
        res = scipy.optimize.minimize(
            lambda x: -x[-1],
            x0,
            jac=lambda x: np.concatenate([np.zeros(dim), [-1.0]]),
            constraints=[improvement, ball],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 1000},
        )
        d = g0 + radius * res.x[:-1] / max(1.0, np.linalg.norm(res.x[:-1]))
        if best is None or np.min(G @ d) > np.min(G @ best):
            best = d
    # A best worst case of 0 reached inside the ball is not unique: the documented
    # choice is then the optimum closest to g_0, its projection onto {d : G d >= 0}.
    projection = g0 + _nnls(G.T, -g0) @ G
    scale = np.linalg.norm(G, axis=1).min() * np.linalg.norm(g0)
    if abs(np.min(G @ best)) < 1e-9 * scale and np.linalg.norm(projection - g0) <= radius:
        return projection
    return best


# --- the strategies under test ----------------------------------------------------
METHODS = {
    # name: (registered name, constructor arguments, tolerance on the update)
    "upgrad": ("upgrad", {}, 1e-10),
    "upgrad_active_set": ("upgrad", {"max_exact_tasks": 0}, 1e-10),
    "mgda": ("mgda", {}, 1e-10),
    "mgda_active_set": ("mgda", {"max_exact_tasks": 0}, 1e-10),
    "nash_mtl": ("nash_mtl", {}, 1e-8),
    "imtl": ("imtl", {}, 1e-9),
    "aligned_mtl": ("aligned_mtl", {}, 1e-9),
    "cagrad": ("cagrad", {"rescale": 0}, 1e-7),
    "cagrad_frank_wolfe": ("cagrad", {"rescale": 0, "max_exact_tasks": 0}, 1e-7),
    "pcgrad": ("pcgrad", {"seed": 5}, 1e-10),
}
#: alpha(s G) = s^power alpha(G).
POWERS = {"nash_mtl": -1}


#: Every strategy is built for this many tasks; smaller cases pad with absent tasks.
NUM_TASKS = 10
_CACHE = {}


def _strategy(method):
    """One built strategy per method, with its graph function (traced once per dtype)."""
    if method not in _CACHE:
        name, kwargs, _ = METHODS[method]
        strategy = kmtl.weighting.get(name, **kwargs)
        strategy.build([f"t{i}" for i in range(NUM_TASKS)])
        strategy.graph = tf.function(lambda gram, *rest: strategy.weights_from_gram(gram, *rest)[0])
        _CACHE[method] = strategy
    return _CACHE[method]


def _padded(G):
    """`G` with zero rows appended up to `NUM_TASKS`, and the `present` mask of its own rows."""
    rows = np.zeros((NUM_TASKS, G.shape[1]), G.dtype)
    rows[: len(G)] = G
    return rows, np.arange(NUM_TASKS) < len(G)


def _alpha(strategy, G, fn=None):
    """The strategy's weights for the rows of `G` (absent padding tasks dropped)."""
    rows, present = _padded(G)
    args = (tf.ones(NUM_TASKS, G.dtype), tf.constant(present), tf.constant(0, tf.int64), strategy.state())
    alpha = np.asarray((fn or strategy.graph)(tf.constant(rows @ rows.T), *args), np.float64)
    assert np.all(alpha[len(G) :] == 0), f"absent tasks got weights {alpha[len(G) :]}"
    return alpha[: len(G)]


def _reference(method, strategy, G):
    if method.startswith("upgrad"):
        return _upgrad(G) @ G
    if method.startswith("mgda"):
        return _mgda(G) @ G
    if method == "nash_mtl":
        return _nash(G, strategy.ridge) @ G
    if method == "imtl":
        return _imtl(G) @ G
    if method == "aligned_mtl":
        return _aligned(G) @ G
    if method.startswith("cagrad"):
        return _cagrad_update(G, strategy.c)
    orders = _random.orders(_random.key(strategy.seed, 0), NUM_TASKS).numpy()
    return pcgrad_reference(_padded(G)[0], orders)


def _relative_error(d, reference, G):
    # Relative to the reference update, or to the smallest gradient where that is 0.
    floor = np.linalg.norm(G, axis=1).min()
    return np.linalg.norm(d - reference) / max(np.linalg.norm(reference), floor)


def _check_property(method, strategy, G, alpha, kind, seed):
    """The defining property of each method, with scale-free tolerances."""
    d = alpha @ G
    norms = np.linalg.norm(G, axis=1)
    tiny = 1e-13 * norms.max()  # |d| below this is a zero update
    unit = max(np.linalg.norm(d), 1e-6 * norms.min())  # scale of d in relative tests
    where = f"{kind} seed {seed}"
    zero = np.linalg.norm(d) <= tiny  # a zero update (compared with the reference only)
    if method.startswith("upgrad") and not zero:
        cosines = G @ d / (norms * np.linalg.norm(d))
        assert cosines.min() >= -1e-10, f"{where}: conflict, min cosine {cosines.min():.2e}"
    if method.startswith("mgda"):
        assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-12, f"{where}: alpha={alpha}"
    if method.startswith("mgda") and not zero:
        # KKT of min |d|^2 on the simplex: g_t . d >= |d|^2, with equality where alpha_t > 0.
        slack = (G @ d - d @ d) / (norms * np.linalg.norm(d))
        assert slack.min() >= -1e-10, f"{where}: KKT violated by {-slack.min():.2e}"
        support = alpha > 1e-9
        assert np.abs(slack[support]).max() <= 1e-9, f"{where}: KKT gap {np.abs(slack[support]).max():.2e}"
    if method == "nash_mtl":
        K = G @ G.T
        ridged = (K @ alpha + strategy.ridge * norms**2 * alpha) * alpha
        err = np.abs(ridged - 1).max()
        assert err < 1e-6, f"{where}: (K alpha)_t alpha_t off 1 by {err:.2e}"
        if kind in FULL_RANK:  # a solution of the unregularised equations exists
            beta = alpha * norms
            err = np.abs((K @ alpha) * alpha - 1).max()
            assert err < 2 * strategy.ridge * beta.max() ** 2 + 1e-9, f"{where}: residual {err:.2e}"
    if method == "imtl" and kind in FULL_RANK:
        projections = (G / norms[:, None]) @ d
        spread = np.ptp(projections) / np.abs(projections).mean()
        assert spread < 1e-8, f"{where}: projections differ by {spread:.2e}"
        paper = _imtl_paper(G) @ G
        if kind in ("gaussian", "conflicting"):  # elsewhere the inverse of D U^T itself loses digits
            err = _relative_error(d, paper, G)
            assert err < 1e-9, f"{where}: paper closed form, relative error {err:.2e}"
    if method.startswith("cagrad"):
        g0 = G.mean(0)
        radius = strategy.c * np.linalg.norm(g0)
        assert np.linalg.norm(d - g0) <= radius * (1 + 1e-9), f"{where}: outside the ball"
        worst, reference = np.min(G @ d), np.min(G @ _cagrad_update(G, strategy.c))
        gap = (reference - worst) / (norms.min() * unit)
        assert gap < 1e-9, f"{where}: worst-case improvement below the reference by {gap:.2e}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_exact_reference(method, kind):
    tolerance = METHODS[method][2]
    if kind == "parallel":
        # K_n has eigenvalues ~1e-8 there: the Gram matrix itself fixes the answer to ~T eps / 1e-8.
        tolerance = max(tolerance, 1e-6)
    for seed in SEEDS:
        G = _matrix(kind, seed)
        strategy = _strategy(method)
        alpha = _alpha(strategy, G)
        err = _relative_error(alpha @ G, _reference(method, strategy, G), G)
        assert err < tolerance, f"{kind} seed {seed}: relative error {err:.2e} (tolerance {tolerance:.0e})"
        _check_property(method, strategy, G, alpha, kind, seed)


@pytest.mark.parametrize("kind", ["norms", "wide10x7", "opposite"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_scale_invariance(method, kind):
    G = _matrix(kind, 0)
    strategy = _strategy(method)
    alpha = _alpha(strategy, G)
    power = POWERS.get(METHODS[method][0], 0)
    for scale in (1e-4, 1e4):
        scaled = _alpha(strategy, G * scale) / scale**power
        err = np.linalg.norm((scaled - alpha) @ G) / max(
            np.linalg.norm(alpha @ G), np.linalg.norm(G, axis=1).min()
        )
        assert err < 1e-9, f"G * {scale:g}: relative change {err:.2e}"


@pytest.mark.parametrize("method", ["upgrad", "mgda", "nash_mtl", "imtl", "aligned_mtl", "cagrad", "pcgrad"])
def test_under_xla(method):
    # One compiled function per method, every class through it (seed 1).
    strategy = _strategy(method)
    compiled = tf.function(lambda gram, *rest: strategy.weights_from_gram(gram, *rest)[0], jit_compile=True)
    for kind in KINDS:
        tolerance = max(METHODS[method][2], 1e-6 if kind == "parallel" else 1e-8)
        G = _matrix(kind, 1)
        reference = _reference(method, strategy, G)
        err = _relative_error(_alpha(strategy, G, compiled) @ G, reference, G)
        assert err < tolerance, f"{kind}: relative error under XLA {err:.2e}"


@pytest.mark.parametrize("method", ["upgrad", "mgda", "nash_mtl", "imtl", "aligned_mtl", "cagrad", "pcgrad"])
def test_float32_gram(method):
    # A float32 Gram matrix (as the training step passes it): float64 inside, float32 out.
    G = _matrix("gaussian", 2)
    strategy = _strategy(method)
    alpha = _alpha(strategy, G.astype("float32"))
    err = _relative_error(alpha @ G, _reference(method, strategy, G), G)
    assert err < 1e-4, f"relative error {err:.2e}"
