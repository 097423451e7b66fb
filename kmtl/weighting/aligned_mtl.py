"""Aligned-MTL (Senushkin et al., 2023): align the principal components of the task gradients."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class AlignedMTL(Weighting):
    """Aligned-MTL: make the linear system of task gradients well conditioned.

    With the eigen-decomposition of the Gram matrix `K = G G^T = V S V^T`
    (`S = diag(s_1 >= ... >= s_r > 0)` on its numerical rank `r`), the
    task gradients `G = V S^1/2 W^T` are replaced by the aligned gradients
    `sigma_min V W^T`, which have the same principal directions but all
    singular values equal to the smallest one, `sigma_min = sqrt(s_r)`
    (condition number 1: no component dominates, none conflicts). In terms
    of the original gradients this is `B G` with

        B = sigma_min V S^-1/2 V^T,

    and the update is the sum of the aligned gradients, `alpha = B 1`
    (Algorithm 1 with unit task weights, as in LibMTL; torchjd uses the mean,
    i.e. `alpha / T`). For orthogonal gradients every task gradient is
    rescaled to the smallest gradient norm: `alpha_t = min_s |g_s| / |g_t|`.
    Eigenvalues below `max(s) * T * eps` (eps of the input dtype) count as
    zero, so identical or opposite gradients are handled (opposite gradients
    give a zero update). The decomposition is `tf.linalg.eigh` in float64.
    Absent tasks have zero rows in `K` and get weight 0.

    Args:
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

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

    def weights_from_gram(self, gram, losses, present, step):
        num_tasks = gram.shape[0]
        K, _ = _solvers.normalized_gram(gram, present)
        mask = tf.cast(present, tf.float64)
        eigenvalues, vectors = tf.linalg.eigh(K)
        eps = float(np.finfo(gram.dtype.as_numpy_dtype).eps)
        tolerance = tf.reduce_max(eigenvalues) * num_tasks * eps
        keep = eigenvalues > tolerance
        inverse_sqrt = tf.where(
            keep, 1.0 / tf.sqrt(tf.maximum(eigenvalues, 1e-300)), tf.zeros_like(eigenvalues)
        )
        smallest = tf.reduce_min(
            tf.where(keep, eigenvalues, tf.fill(tf.shape(eigenvalues), tf.constant(np.inf, tf.float64)))
        )
        balance = tf.sqrt(tf.where(tf.reduce_any(keep), smallest, 0.0)) * tf.matmul(
            vectors * inverse_sqrt[None, :], vectors, transpose_b=True
        )
        alpha = tf.linalg.matvec(balance, mask) * mask
        alpha = tf.where(tf.reduce_any(keep), alpha, mask)
        return tf.cast(alpha, gram.dtype)
