"""Small in-graph solvers shared by the gradient-level strategies.

Every problem here lives on the `T x T` Gram matrix `K = G G^T` of the task
gradients (T = number of tasks, small), never on the gradients themselves.
The solvers compute in float64 whatever the input dtype (the problems are
tiny, and the Gram matrix of nearly parallel gradients is badly conditioned),
use only TensorFlow ops that work inside `tf.function` and under XLA
(`tf.while_loop`, batched `tf.linalg.solve`), and handle the `present` mask:
an absent task is removed from the problem and gets weight 0.

* `normalized_gram`: masked, scale-free copy of the Gram matrix.
* `min_norm_weights`: `argmin_{w in simplex} w^T K w` (MGDA's min-norm
  point): closed form for two tasks, Frank-Wolfe with away steps otherwise.
* `frank_wolfe`: the away-step Frank-Wolfe loop over the simplex, for a
  convex objective given by its gradient and an exact line search.
* `nonnegative_qp`: `argmin_{l >= 0} 1/2 l^T K l + c^T l` for several `c`
  at once (exact active-set enumeration for up to `max_exact_tasks` tasks,
  accelerated projected gradient plus an exact polish above).
"""

from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf

_TINY = 1e-30


def normalized_gram(gram, present):
    """Returns `(K, scale)`: the float64 Gram matrix of the present tasks over `scale`.

    Rows and columns of absent tasks are zeroed. `scale` is the mean squared
    norm of the present task gradients (1 when they are all zero), so `K`
    has a unit mean diagonal; the solutions of every problem in this module
    are invariant to that scaling.
    """
    gram = tf.cast(gram, tf.float64)
    gram = 0.5 * (gram + tf.transpose(gram))
    mask = tf.cast(present, tf.float64)
    gram = gram * mask[:, None] * mask[None, :]
    count = tf.maximum(tf.reduce_sum(mask), 1.0)
    scale = tf.linalg.trace(gram) / count
    scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    return gram / scale, scale


def uniform_weights(present):
    """`1 / n_present` on the present tasks, 0 elsewhere (float64)."""
    mask = tf.cast(present, tf.float64)
    return mask / tf.maximum(tf.reduce_sum(mask), 1.0)


def quadratic_step(w, d, gram, gamma_max):
    """Exact line search of `(w + g d)^T K (w + g d)` over `g in [0, gamma_max]`."""
    kd = tf.linalg.matvec(gram, d)
    curvature = tf.tensordot(d, kd, 1)
    slope = tf.tensordot(w, kd, 1)
    unconstrained = -slope / tf.maximum(curvature, _TINY)
    flat = tf.where(slope < 0, gamma_max, tf.zeros_like(gamma_max))
    gamma = tf.where(curvature > 1e-20, unconstrained, flat)
    return tf.clip_by_value(gamma, tf.zeros_like(gamma_max), gamma_max)


def frank_wolfe(gradient_fn, step_fn, present, max_iter, tol, init=None):
    """Minimises a convex function over the simplex of the present tasks.

    Frank-Wolfe with away steps (linear convergence on polytopes for
    strongly convex objectives, unlike the plain method).

    Args:
        gradient_fn: `w -> [T]` gradient of the objective (float64).
        step_fn: `(w, d, gamma_max) -> gamma`, the exact line search of the
            objective along `d` over `[0, gamma_max]`.
        present: `[T]` bool; absent tasks keep weight 0.
        max_iter: maximum number of iterations (a Python int).
        tol: stop when the Frank-Wolfe duality gap is below `tol`.
        init: optional starting point on the simplex (default: uniform).

    Returns:
        `[T]` float64 weights on the simplex.
    """
    mask = tf.cast(present, tf.float64)
    w0 = uniform_weights(present) if init is None else tf.cast(init, tf.float64)
    num_tasks = tf.shape(mask)[0]
    inf = tf.constant(np.inf, tf.float64)

    def body(i, w, gap):
        grad = gradient_fn(w)
        s = tf.argmin(tf.where(present, grad, inf))
        active = tf.logical_and(present, w > 0)
        v = tf.argmax(tf.where(active, grad, -inf))
        wg = tf.tensordot(w, grad, 1)
        gap_fw = wg - tf.gather(grad, s)
        gap_away = tf.gather(grad, v) - wg
        use_fw = gap_fw >= gap_away
        e_s = tf.one_hot(s, num_tasks, dtype=tf.float64)
        e_v = tf.one_hot(v, num_tasks, dtype=tf.float64)
        d = tf.where(use_fw, e_s - w, w - e_v)
        w_v = tf.gather(w, v)
        gamma_max = tf.where(use_fw, tf.ones_like(w_v), w_v / tf.maximum(1.0 - w_v, _TINY))
        gamma = step_fn(w, d, gamma_max)
        w_new = tf.maximum(w + gamma * d, 0.0) * mask
        w_new = w_new / tf.maximum(tf.reduce_sum(w_new), _TINY)
        # one_hot over a dynamic size loses the static shape; keep w0's.
        w_new.set_shape(w0.shape)
        return i + 1, w_new, gap_fw

    def cond(i, w, gap):
        return tf.logical_and(i < max_iter, gap > tol)

    _, w, _ = tf.while_loop(
        cond, body, (tf.constant(0), w0, tf.constant(np.inf, tf.float64)), maximum_iterations=max_iter
    )
    return w


def min_norm_weights(gram, present, max_iter: int = 250, tol: float = 1e-12):
    """Weights of the min-norm point of the convex hull of the task gradients.

    Solves `min_{w in simplex} w^T K w` over the present tasks. Two tasks use
    the closed form `w_1 = clip((g_2 - g_1).g_2 / |g_1 - g_2|^2, 0, 1)`
    (1/2 for identical gradients); more tasks use `frank_wolfe` started from
    the uniform weights.

    Args:
        gram: `[T, T]` Gram matrix (any float dtype; T must be static).
        present: `[T]` bool mask.

    Returns:
        `[T]` float64 weights (0 for absent tasks, summing to 1 when any task
        is present).
    """
    K, _ = normalized_gram(gram, present)
    num_tasks = gram.shape[0]
    if num_tasks == 2:
        denominator = K[0, 0] + K[1, 1] - 2.0 * K[0, 1]
        w1 = tf.where(
            denominator > 1e-20,
            (K[1, 1] - K[0, 1]) / tf.maximum(denominator, _TINY),
            tf.constant(0.5, tf.float64),
        )
        w1 = tf.clip_by_value(w1, 0.0, 1.0)
        both = tf.stack([w1, 1.0 - w1])
        # One task present: it gets weight 1.
        return tf.where(tf.reduce_all(present), both, uniform_weights(present))

    def gradient(w):
        return 2.0 * tf.linalg.matvec(K, w)

    def step(w, d, gamma_max):
        return quadratic_step(w, d, K, gamma_max)

    return frank_wolfe(gradient, step, present, max_iter, tol)


def _subsets(num_tasks: int) -> np.ndarray:
    return np.array(list(itertools.product((0.0, 1.0), repeat=num_tasks)), dtype=np.float64)


def _polish(K, C, lam, ridge):
    """Solves the equality system on the support of `lam` (an exact refinement)."""
    support = tf.cast(lam > 0, tf.float64)  # [T, P]
    # One system per problem p: K restricted to support_p, identity elsewhere.
    s = tf.transpose(support)  # [P, T]
    A = K[None] * s[:, :, None] * s[:, None, :] + tf.linalg.diag(1.0 - s) + ridge * tf.linalg.diag(s)
    z = tf.linalg.solve(A, (-tf.transpose(C) * s)[:, :, None])[:, :, 0]
    return tf.transpose(z)


def _kkt_residual(K, C, lam):
    """Natural residual `max_j |min(l_j, (K l + c)_j)|` per problem (column)."""
    grad = tf.matmul(K, lam) + C
    return tf.reduce_max(tf.abs(tf.minimum(lam, grad)), axis=0)


def nonnegative_qp(gram, linear, present, max_exact_tasks: int = 10, max_iter: int = 2000):
    """Solves `min_{l >= 0} 1/2 l^T K l + c^T l` for every column `c` of `linear`.

    `K` is positive semi-definite (a Gram matrix), so this is a non-negative
    least-squares problem and has a solution supported on linearly
    independent rows. Coordinates of absent tasks are fixed at 0.

    With `T <= max_exact_tasks` every support set `S` (2^T of them) is
    tried at once: `K_SS l_S = -c_S` is solved in one batched solve and the
    candidate with the smallest KKT residual is kept, which is exact. Above
    that, FISTA (accelerated projected gradient, with restarts, on the
    diagonally scaled problem) runs until its KKT residual is below 1e-12,
    then the equality system on the support found is solved exactly and kept
    if it is better.

    Args:
        gram: `[T, T]` PSD matrix (T static).
        linear: `[T, P]` linear terms, one problem per column.
        present: `[T]` bool mask.
        max_exact_tasks: largest T solved by enumeration.
        max_iter: iteration cap of the projected-gradient path.

    Returns:
        `[T, P]` float64 solutions.
    """
    num_tasks = gram.shape[0]
    mask = tf.cast(present, tf.float64)
    K = tf.cast(gram, tf.float64) * mask[:, None] * mask[None, :]
    C = tf.cast(linear, tf.float64) * mask[:, None]
    scale = tf.reduce_max(tf.linalg.diag_part(K))
    scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    K, C = K / scale, C / scale
    # Absent coordinates: decoupled, K_jj = 1 and c_j = 0, so l_j = 0.
    K = K + tf.linalg.diag(1.0 - mask)
    ridge = 1e-13
    if num_tasks <= max_exact_tasks:
        subsets = tf.constant(_subsets(num_tasks))  # [S, T]
        A = (
            K[None] * subsets[:, :, None] * subsets[:, None, :]
            + tf.linalg.diag(1.0 - subsets)
            + ridge * tf.linalg.diag(subsets)
        )
        Z = tf.linalg.solve(A, -C[None] * subsets[:, :, None])  # [S, T, P]
        grad = tf.einsum("ij,sjp->sip", K, Z) + C[None]
        inside = subsets[:, :, None]
        violation = tf.maximum(
            inside * tf.maximum(-Z, tf.abs(grad)),
            (1.0 - inside) * tf.maximum(-grad, 0.0),
        )
        residual = tf.reduce_max(violation, axis=1)  # [S, P]
        residual = tf.where(tf.math.is_finite(residual), residual, np.inf)
        best = tf.argmin(residual, axis=0)  # [P]
        lam = tf.transpose(tf.gather(tf.transpose(Z, (2, 0, 1)), best, batch_dims=1))
        return tf.maximum(lam, 0.0) * mask[:, None]

    # Diagonal scaling l = D m with D = diag(K)^-1/2 keeps l >= 0 <=> m >= 0.
    d = 1.0 / tf.sqrt(tf.maximum(tf.linalg.diag_part(K), 1e-12))
    Ks = K * d[:, None] * d[None, :]
    Cs = C * d[:, None]
    step = 1.0 / tf.maximum(tf.reduce_max(tf.reduce_sum(tf.abs(Ks), axis=1)), _TINY)

    def body(i, m, y, t, res):
        m_new = tf.maximum(y - step * (tf.matmul(Ks, y) + Cs), 0.0)
        t_new = 0.5 * (1.0 + tf.sqrt(1.0 + 4.0 * t * t))
        # Restart the momentum when it goes uphill (O'Donoghue & Candes).
        uphill = tf.reduce_sum((y - m_new) * (m_new - m)) > 0
        y_new = tf.where(uphill, m_new, m_new + ((t - 1.0) / t_new) * (m_new - m))
        t_new = tf.where(uphill, tf.ones_like(t_new), t_new)
        return i + 1, m_new, y_new, t_new, tf.reduce_max(_kkt_residual(Ks, Cs, m_new))

    def cond(i, m, y, t, res):
        return tf.logical_and(i < max_iter, res > 1e-12)

    m0 = tf.zeros_like(Cs)
    start = (tf.constant(0), m0, m0, tf.constant(1.0, tf.float64), tf.constant(np.inf, tf.float64))
    _, m, _, _, _ = tf.while_loop(cond, body, start, maximum_iterations=max_iter)
    lam = m * d[:, None]
    polished = _polish(K, C, lam, ridge)
    better = _kkt_residual(K, C, tf.maximum(polished, 0.0)) <= _kkt_residual(K, C, lam)
    lam = tf.where(better[None, :], tf.maximum(polished, 0.0), lam)
    return lam * mask[:, None]


# --- stateless randomness ------------------------------------------------------
def check_seed(seed):
    """Validates a strategy's `seed` argument; `None` draws one (kept in the config)."""
    import random

    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"`seed` must be an integer in [0, 2**63) or None. Received: seed={seed!r}")
    return int(seed)


_MASK32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash (lowbias32) on int64 tensors holding 32-bit values.

    Plain integer ops, so the numbers are the same with and without XLA
    (TensorFlow's stateless random ops are not: XLA uses other kernels).
    """
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x7FEB352D, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = tf.bitwise.bitwise_and(x * 0x846CA68B, _MASK32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def _fold(key, value):
    value = tf.bitwise.bitwise_and(tf.cast(value, tf.int64), _MASK32)
    return _mix(tf.bitwise.bitwise_xor(key, _mix(value)))


def next_key(seed: int, draws):
    """Returns a scalar int64 key for this draw and advances the `draws` variable.

    The key depends on `seed` and the draw counter only: every replica holds
    the same counter, so every replica draws the same numbers, and the
    counter is saved with the model, so a reloaded strategy continues the
    sequence.
    """
    count = tf.cast(tf.convert_to_tensor(draws), tf.int64)
    key = _fold(tf.constant(seed & _MASK32, tf.int64), seed >> 32)
    key = _fold(_fold(key, tf.bitwise.right_shift(count, 32)), count)
    draws.assign_add(tf.constant(1, tf.int64))
    return key


def uniform(key, shape, stream: int = 0):
    """Uniform float32 numbers in [0, 1) of `shape`, a pure function of `(key, stream)`."""
    size = tf.reduce_prod(tf.cast(shape, tf.int64))
    base = _fold(key, stream)
    bits = _fold(base, tf.range(size, dtype=tf.int64))
    values = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (2.0**-24)
    return tf.reshape(values, shape)


def random_orders(key, num_tasks: int):
    """`[T, T]` int32: row i is a random permutation of the tasks (for task i)."""
    return tf.argsort(uniform(key, (num_tasks, num_tasks)), axis=1, stable=True)
