"""Aligned-MTL (Senushkin et al., 2023): align the principal components of the task gradients."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting


@register("weighting", "aligned_mtl")
class AlignedMTL(Weighting):
    """Aligned-MTL: make the linear system of task gradients well conditioned.

    With the eigen-decomposition of the Gram matrix `K = G G^T = V S V^T`
    (`S = diag(s_1 >= ... >= s_r > 0)` on its rank `r`), the task gradients
    `G = V S^1/2 W^T` are replaced by the aligned gradients
    `sigma_min V W^T`, which have the same principal directions but all
    singular values equal to the smallest one, `sigma_min = sqrt(s_r)`
    (condition number 1: no component dominates, none conflicts). In terms
    of the original gradients this is `B G` with

        B = sigma_min V S^-1/2 V^T,

    and the update is the sum of the aligned gradients, `alpha = B 1`
    (Algorithm 1 with unit task weights, as in LibMTL; torchjd uses the mean,
    i.e. `alpha / T`). For orthogonal gradients every task gradient is
    rescaled to the smallest gradient norm: `alpha_t = min_s |g_s| / |g_t|`.
    `alpha(c G) = alpha(G)`.

    Numerics: the decomposition is a cyclic Jacobi eigendecomposition in
    float64 (`kmtl.weighting._solvers.symmetric_eigh`), the same with and
    without XLA. Jacobi rotations with a relative stopping rule give the
    small eigenvalues of `K = D^1/2 K_n D^1/2` (`D = diag(K)`) with a small
    relative error when `K_n` is well conditioned, where a QR-type
    eigensolver leaves them an absolute error of `eps * max(s)`: this
    matters when the gradient norms spread over orders of magnitude. The
    rank `r` is decided on the unit-diagonal `K_n`, i.e. on the gradients'
    directions only: its eigenvalues below `max * T * eps` (eps of the input
    dtype) count as zero.

    Degenerate cases: with more tasks than the rank, `V` spans the rank and
    `sigma_min` is the smallest non-zero singular value; identical gradients
    are handled, and opposite gradients give a zero update. Absent tasks and
    zero gradients have zero rows in `K` and get weight 0; if every present
    gradient is zero the weights are 1 (the update is zero anyway).

    Args:
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import AlignedMTL
    >>> G = np.array([[2.0, 0.0], [0.0, 0.5]])
    >>> AlignedMTL().aggregate(G).numpy()  # alpha = [0.25, 1]
    array([0.5, 0.5])

    References:
        Senushkin, Patakin, Kuznetsov and Konushin. Independent Component
        Alignment for Multi-Task Learning. CVPR 2023.
        https://arxiv.org/abs/2305.19000
    """

    level = "gradient"
    gram_based = True

    def weights_from_gram(self, gram, values, present, step, state):
        num_tasks = gram.shape[0]
        K = _solvers.gram64(gram, present)
        mask = _solvers.mask64(present)
        Kn, _, _ = _solvers.unit_diagonal(K, present)
        # The rank from the directions only; the spectrum from K itself.
        directions, _ = _solvers.symmetric_eigh(Kn)
        cutoff = ops.max(directions) * num_tasks * _solvers.eps(gram.dtype)
        rank = ops.sum(ops.cast(directions > ops.maximum(cutoff, 1e-300), "int32"))
        eigenvalues, vectors = _solvers.symmetric_eigh(K)
        # The r largest eigenvalues are the non-zero ones.
        ordered = ops.sort(eigenvalues)
        smallest = ops.take(ordered, ops.clip(num_tasks - rank, 0, num_tasks - 1))
        top = ops.logical_and(eigenvalues >= smallest, eigenvalues > 0)
        inverse_sqrt = ops.where(top, 1.0 / ops.sqrt(ops.where(top, eigenvalues, 1.0)), 0.0)
        sigma_min = ops.sqrt(ops.maximum(smallest, 0.0))
        balance = sigma_min * ops.matmul(vectors * inverse_sqrt[None, :], ops.transpose(vectors))
        alpha = ops.matmul(balance, mask) * mask
        alpha = ops.where(rank > 0, alpha, mask)
        return ops.cast(alpha, gram.dtype), {}
