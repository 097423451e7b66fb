"""IMTL-G (Liu et al., 2021): the update with equal projections onto every task gradient."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting


@register("weighting", "imtl")
class IMTL(Weighting):
    """Impartial multi-task learning, gradient balance (IMTL-G).

    Finds the update `d = sum_t alpha_t g_t` with `sum_t alpha_t = 1` whose
    projection onto every unit task gradient `u_t = g_t / |g_t|` is the
    same: `d . u_1 = d . u_2 = ... = d . u_T`. The paper's closed form is
    `alpha_{2:T} = g_1 U^T (D U^T)^-1` with `D_t = g_1 - g_t` and
    `U_t = u_1 - u_t`, `alpha_1 = 1 - sum_{t>1} alpha_t`; equivalently
    `alpha = beta / sum(beta)` with

        beta = N^-1 K_n^+ 1,   K_n = N^-1 K N^-1,   N = diag(|g_t|),

    (`K_n beta' = 1` says `u_t . G^T N^-1 beta' = 1` for every t), which kmtl
    computes from the Gram matrix with the pseudo-inverse `K_n^+` (a Jacobi
    eigendecomposition of the unit-diagonal `K_n` in float64, precise with
    and without XLA; eigenvalues below `T * eps * max`, eps of the input
    dtype, dropped). When the gradients are
    linearly independent this is exactly the paper's solution. When they are
    not (more tasks than the gradients' rank, parallel gradients), no
    non-zero update has exactly equal projections; then `G^T N^-1 K_n^+ 1`
    is the least-squares fit `argmin_d sum_t (u_t . d - 1)^2` (of minimum
    norm) and the update is that direction, scaled so that the weights sum
    to 1. Everything is built from the unit vectors `u_t`, so a task's
    gradient norm only enters through its own weight `alpha_t ~ 1 / |g_t|`:
    `alpha(c G) = alpha(G)` and widely spread norms are handled alike.

    Degenerate cases: if `1` is orthogonal to the range of `K_n` (no
    direction has a positive projection on every task, e.g. two opposite
    gradients) or `sum(beta)` vanishes, the weights are
    `alpha_t ~ 1 / |g_t|` (for two opposite gradients: a zero update). As in
    the paper, the common projection `1 / sum(beta)` is negative (the update
    ascends every loss) when `sum(beta) < 0`, which can happen when the
    number of tasks is close to the gradients' rank. Absent tasks and tasks
    whose gradient is exactly zero have no direction: they take no part and
    get weight 0. If no task has a non-zero gradient, the present tasks get
    equal weights (the update is zero anyway).

    Args:
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import IMTL
    >>> G = np.array([[1.0, 0.0], [0.0, 3.0]])
    >>> IMTL().aggregate(G).numpy()  # d . u_1 = d . u_2 = 0.75
    array([0.75, 0.75])

    References:
        Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang. Towards Impartial
        Multi-task Learning. ICLR 2021. https://openreview.net/forum?id=IMPnRXEWpvr
    """

    level = "gradient"
    gram_based = True

    def weights_from_gram(self, gram, values, present, step, state):
        num_tasks = gram.shape[0]
        K = _solvers.gram64(gram, present)
        Kn, inv_norm, valid = _solvers.unit_diagonal(K, present)
        valid_f = ops.cast(valid, "float64")
        eigenvalues, vectors = _solvers.symmetric_eigh(Kn)
        cutoff = ops.max(eigenvalues) * num_tasks * _solvers.eps(gram.dtype)
        keep = eigenvalues > ops.maximum(cutoff, 1e-300)
        inverse = ops.where(keep, 1.0 / ops.where(keep, eigenvalues, 1.0), 0.0)
        coordinates = ops.matmul(ops.transpose(vectors), valid_f)  # V^T 1
        beta = ops.matmul(vectors, inverse * coordinates) * inv_norm
        fitted = ops.sum(ops.where(keep, coordinates * coordinates, 0.0))  # |P_range 1|^2
        total = ops.sum(beta)
        count = ops.maximum(ops.sum(valid_f), 1.0)
        solvable = ops.logical_and(fitted > 1e-10 * count, ops.abs(total) > 1e-12 * ops.sum(ops.abs(beta)))
        safe_total = ops.where(solvable, total, 1.0)
        fallback = inv_norm / ops.maximum(ops.sum(inv_norm), 1e-300)
        alpha = ops.where(solvable, beta / safe_total, fallback) * valid_f
        present_f = _solvers.mask64(present)
        alpha = ops.where(ops.any(valid), alpha, present_f / ops.maximum(ops.sum(present_f), 1.0))
        return ops.cast(alpha, gram.dtype), {}
