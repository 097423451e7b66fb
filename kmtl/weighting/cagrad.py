"""CAGrad (Liu et al., 2021): conflict-averse gradient descent on the Gram matrix."""

from __future__ import annotations

import numpy as np
from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks, _solvers
from kmtl.weighting.base import Weighting

_RESCALES = (0, 1, 2)


def _line_search(K, b, radius, w, d, gamma_max):
    """Exact minimiser over [0, gamma_max] of h(g) = g * d.K b + radius * sqrt(Q(g)).

    `Q(g) = |g_w + g g_d|^2 = p + 2 q g + r g^2`. Where `h'` vanishes,
    `u = q + r g` satisfies `u^2 (radius^2 r - s^2) = s^2 (r p - q^2)` with
    `s = d.K b` and `u` of the sign opposite to `s`; if `radius^2 r <= s^2`,
    `h` is monotone with the sign of `s`. Flat directions (`r` below 1e-15
    of the problem's scale) are treated as linear.
    """
    kd = ops.matmul(K, d)
    s = ops.sum(kd * b)
    p = ops.sum(w * ops.matmul(K, w))
    q = ops.sum(w * kd)
    r = ops.sum(d * kd)
    scale = ops.maximum(p + ops.abs(r), 1e-300)
    denominator = radius * radius * r - s * s
    u_squared = s * s * ops.maximum(r * p - q * q, 0.0) / ops.maximum(denominator, 1e-300)
    u = -ops.sign(s) * ops.sqrt(u_squared)
    stationary = (u - q) / ops.maximum(r, 1e-300)
    monotone = ops.where(s < 0, gamma_max, 0.0)
    gamma = ops.where(ops.logical_and(denominator > 0, r > 1e-15 * scale), stationary, monotone)
    return ops.clip(gamma, 0.0, gamma_max)


def _candidates(Kn, inv, h, radius, supports, valid):
    """KKT candidates of the CAGrad problem for every support, in per-task units.

    For a support `S` the optimal update `d = g_0 + G^T y` has equal inner
    products `g_t . d = mu` on `S`, `y >= 0` on `S` (0 elsewhere) and
    `|G^T y| = radius`. With `y = inv * z` and `K_n` the unit-diagonal Gram
    matrix this is `(K_n z)_S = mu inv_S - h_S` (`h = inv * K b`) and
    `z^T K_n z = radius^2`: `z = mu p - q` with `p, q` from one solve and `mu`
    a root of a quadratic. Both roots are returned.

    Returns:
        `(z, violation)`: `[2N, T]` candidates and their `[2N]` relative KKT
        violations (inf where the quadratic has no real root).
    """
    rhs = ops.stack([inv, h], axis=1)  # [T, 2]
    pq = _solvers.support_solve(Kn, rhs[None], supports)  # [N, T, 2]
    p, q = pq[:, :, 0], pq[:, :, 1]
    kp, kq = ops.matmul(p, Kn), ops.matmul(q, Kn)
    a = ops.sum(p * kp, axis=1)
    b = ops.sum(p * kq, axis=1)
    c = ops.sum(q * kq, axis=1) - radius * radius
    disc = b * b - a * c
    disc = ops.where(disc >= -1e-12 * (b * b + ops.abs(a * c)), ops.maximum(disc, 0.0), np.nan)
    root = ops.sqrt(disc)
    big = b + ops.where(b >= 0, root, -root)
    mus = ops.concatenate([big / a, c / big], axis=0)  # [2N]
    p2, q2 = ops.concatenate([p, p], axis=0), ops.concatenate([q, q], axis=0)
    inside = ops.concatenate([supports, supports], axis=0)
    z = (mus[:, None] * p2 - q2) * inside
    # Projections of d onto the unit task gradients, against mu / |g_t|.
    projection = h[None, :] + ops.matmul(z, Kn)
    target = mus[:, None] * inv[None, :]
    valid_f = ops.cast(valid, "float64")[None, :]
    gap = (projection - target) * valid_f
    violation = ops.maximum(
        ops.max(inside * ops.maximum(-z, ops.abs(gap)), axis=1),
        ops.max((1.0 - inside) * ops.maximum(-gap, 0.0), axis=1),
    )
    norm = ops.sum(z * ops.matmul(z, Kn), axis=1)
    violation = ops.maximum(violation / radius, ops.abs(norm - radius * radius) / (radius * radius))
    violation = ops.where(ops.isfinite(violation), violation, np.inf)
    z = ops.where(ops.isfinite(z), z, 0.0)
    return z, violation


@register("weighting", "cagrad")
class CAGrad(Weighting):
    """Conflict-averse gradient descent.

    CAGrad looks for the update `d` that maximises the worst task's
    first-order improvement `min_t g_t . d` within a ball around the mean
    gradient `g_0`: `|d - g_0| <= c |g_0|`. Its dual is a small problem over
    the simplex,

        w = argmin_{w in simplex}  g_w . g_0 + c |g_0| |g_w|,   g_w = G^T w,

    and the update is `d = g_0 + c |g_0| / |g_w| * g_w`, i.e.
    `alpha = b + c |g_0| / |g_w| * w` (`b` = uniform weights), divided by
    `1 + c^2` (`rescale=1`, the default of the paper's code), `1 + c`
    (`rescale=2`) or not at all (`rescale=0`). With `c = 0` CAGrad is the
    mean gradient (times 1 for any `rescale`). The mean is over the present
    tasks.

    kmtl solves the problem exactly from the Gram matrix: at the optimum
    `d = g_0 + G^T y` with `y >= 0` on a support `S`, every task of `S` has
    the same inner product `g_t . d = mu` (the worst one) and
    `|G^T y| = c |g_0|`, which for a given support is one small linear
    solve and a quadratic equation in `mu`. Up to `max_exact_tasks` tasks
    every support is tried at once and the candidate that satisfies these
    optimality (KKT) conditions is kept; above, Frank-Wolfe with away steps
    and an exact line search (`max_iter` iterations, relative gap 1e-12)
    finds the support, and the same exact solve polishes its answer. The
    systems use the unit-diagonal `D^-1/2 K D^-1/2` and every tolerance is
    relative, so `alpha(s G) = alpha(G)` and tasks with very different
    gradient norms are handled alike.

    Degenerate cases: if `g_0 = 0` (e.g. two opposite gradients of equal
    norm) the ball is a point and the update is 0. Tasks with an exactly
    zero gradient count in `g_0` but not in the worst case (`g_t . d = 0`
    whatever `d`). When the best worst-case improvement is exactly 0 (0 is a
    convex combination of some gradients, e.g. two opposite ones, and the
    ball reaches directions that conflict with none of them) the optimum is
    not unique and need not lie on the sphere: kmtl then returns the optimum
    closest to `g_0`, the projection of `g_0` onto `{d : G d >= 0}` (a
    non-negative program, as in UPGrad). If neither applies to 1e-6
    (relative) the mean gradient is returned.

    Args:
        c: radius of the ball, relative to `|g_0|` (>= 0; 0.4 in the paper's
            multi-task experiments).
        rescale: 0, 1 or 2, as above.
        max_exact_tasks: number of tasks up to which every support is
            enumerated (2^T small systems in one batched solve).
        max_iter: Frank-Wolfe iteration cap (more than `max_exact_tasks`
            tasks).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Raises:
        ValueError: for a negative or non-finite `c`, an unknown `rescale`,
            a `max_exact_tasks` outside [0, 14] or a `max_iter` < 1.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import CAGrad
    >>> G = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> CAGrad(c=0.0).aggregate(G).numpy()
    array([0.5, 0.5])

    References:
        Liu, Liu, Jin, Stone and Liu. Conflict-Averse Gradient Descent for
        Multi-task Learning. NeurIPS 2021. https://arxiv.org/abs/2110.14048
    """

    level = "gradient"
    gram_based = True

    def __init__(
        self, c: float = 0.4, rescale: int = 1, max_exact_tasks: int = 10, max_iter: int = 1000, **kwargs
    ):
        super().__init__(**kwargs)
        self.c = _checks.number(c, "c", low=0.0)
        if isinstance(rescale, bool) or rescale not in _RESCALES:
            raise ValueError(f"`rescale` must be 0, 1 or 2. Received: rescale={rescale!r}")
        self.rescale = int(rescale)
        self.max_exact_tasks = _checks.integer(max_exact_tasks, "max_exact_tasks", low=0, high=14)
        self.max_iter = _checks.positive_int(max_iter, "max_iter")

    def weights_from_gram(self, gram, values, present, step, state):
        K = _solvers.gram64(gram, present)
        b = _solvers.uniform_weights(present)
        kb = ops.matmul(K, b)
        g0_norm = ops.sqrt(ops.maximum(ops.sum(b * kb), 0.0))
        radius = self.c * g0_norm
        if self.c > 0:
            y = self._worst_case_weights(K, kb, b, radius, present)
            y = ops.where(radius > 0, y, 0.0)
            alpha = b + y
        else:
            alpha = b
        if self.rescale == 1:
            alpha = alpha / (1.0 + self.c**2)
        elif self.rescale == 2:
            alpha = alpha / (1.0 + self.c)
        return ops.cast(alpha, gram.dtype), {}

    def _worst_case_weights(self, K, kb, b, radius, present):
        """`y = radius / |g_w| * w` of the optimum (0 where no candidate is valid)."""
        num_tasks = K.shape[0]
        Kn, inv, valid = _solvers.unit_diagonal(K, present)
        valid_f = ops.cast(valid, "float64")
        Kn = Kn + ops.eye(num_tasks, dtype="float64") * (1.0 - valid_f)[None, :]
        h = inv * kb
        safe_radius = ops.where(radius > 0, radius, 1.0)
        if num_tasks <= self.max_exact_tasks:
            supports = ops.convert_to_tensor(_solvers.subsets(num_tasks, empty=False))
            supports = supports * valid_f[None, :]
            z, violation = _candidates(Kn, inv, h, safe_radius, supports, valid)
        else:
            w = self._frank_wolfe(K, kb, b, radius, valid)
            # Candidate supports: the weights above several relative thresholds.
            levels = ops.convert_to_tensor(np.array([1e-12, 1e-9, 1e-6, 1e-3]))
            supports = ops.cast(w[None, :] > levels[:, None] * ops.max(w), "float64") * valid_f[None, :]
            support = supports[0]
            z_polish, v_polish = _candidates(Kn, inv, h, safe_radius, supports, valid)
            gw_norm = ops.sqrt(ops.maximum(ops.sum(w * ops.matmul(K, w)), 0.0))
            z_fw = (radius / ops.maximum(gw_norm, 1e-300)) * w / ops.where(valid, inv, 1.0) * valid_f
            v_fw = self._violation(Kn, inv, h, safe_radius, z_fw, support, valid)
            z = ops.concatenate([z_polish, z_fw[None, :]], axis=0)
            violation = ops.concatenate([v_polish, v_fw[None]], axis=0)
        best = ops.argmin(violation)
        choice = ops.one_hot(best, z.shape[0], dtype="float64")
        y = ops.matmul(choice, z) * inv
        # No boundary optimum: the best worst case is 0 and is reached inside the ball;
        # take the optimum closest to g_0, its projection onto {d : G d >= 0}.
        projection = _solvers.nonnegative_qp(K, kb[:, None], present, self.max_exact_tasks)[:, 0]
        inside = ops.sum(projection * ops.matmul(K, projection)) <= radius * radius * (1.0 + 1e-9)
        fallback = ops.where(inside, projection, 0.0)
        return ops.where(ops.min(violation) <= 1e-6, y, fallback)

    @staticmethod
    def _violation(Kn, inv, h, radius, z, support, valid):
        """Relative KKT violation of one candidate `z`, with `mu` its worst projection."""
        valid_f = ops.cast(valid, "float64")
        projection = h + ops.matmul(Kn, z)
        mu = ops.min(ops.where(valid, projection / ops.where(valid, inv, 1.0), np.inf))
        gap = (projection - mu * inv) * valid_f
        violation = ops.max(support * ops.abs(gap)) / radius
        norm = ops.sum(z * ops.matmul(Kn, z))
        violation = ops.maximum(violation, ops.abs(norm - radius * radius) / (radius * radius))
        return ops.where(ops.isfinite(violation), violation, np.inf)

    def _frank_wolfe(self, K, kb, b, radius, valid):
        """The dual over the simplex of the tasks with a non-zero gradient."""

        def gradient(w):
            kw = ops.matmul(K, w)
            norm = ops.sqrt(ops.maximum(ops.sum(w * kw), 0.0))
            return kb + radius * kw / ops.maximum(norm, 1e-300)

        def step_fn(w, d, gamma_max):
            return _line_search(K, b, radius, w, d, gamma_max)

        return _solvers.frank_wolfe(gradient, step_fn, valid, self.max_iter, 1e-12)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "c": self.c,
            "rescale": self.rescale,
            "max_exact_tasks": self.max_exact_tasks,
            "max_iter": self.max_iter,
        }
        return {**base_config, **config}
