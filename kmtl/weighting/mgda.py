"""MGDA (Sener & Koltun, 2018): the min-norm point of the task gradients' convex hull."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@keras.saving.register_keras_serializable(package="kmtl")
class MGDA(Weighting):
    """Multiple-gradient descent: the min-norm convex combination of the task gradients.

    The weights solve

        alpha = argmin_{alpha in simplex} |sum_t alpha_t g_t|^2
              = argmin_{alpha in simplex} alpha^T K alpha,   K = G G^T,

    and the update is `sum_t alpha_t g_t`, a direction that does not
    increase any task loss to first order (it is zero at a Pareto-stationary
    point). For two tasks the solution is the closed form
    `alpha_1 = clip((g_2 - g_1) . g_2 / |g_1 - g_2|^2, 0, 1)`; for more tasks
    Frank-Wolfe (with away steps, so it converges linearly) runs on `K`
    inside the graph.

    `normalization` rescales the gradients before solving, as in the paper's
    code: `"none"` (default), `"l2"` (`g_t / |g_t|`), `"loss"`
    (`g_t / L_t`) or `"loss+"` (`g_t / (L_t |g_t|)`). As in that code, the
    weights found on the normalized gradients are applied to the original
    gradients.

    MGDA-UB (the paper's cheap upper bound: the same problem on the
    gradients of the shared representation, then one backward pass) is
    `MGDA(mode="representation")`.

    Args:
        normalization: `"none"`, `"l2"`, `"loss"` or `"loss+"`.
        max_iter: Frank-Wolfe iteration cap (3 or more tasks).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for an unknown `normalization` or a `max_iter` < 1.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import MGDA
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> MGDA().aggregate(G).numpy()  # alpha = [0.8, 0.2]
    array([0.8, 0.4])

    References:
        Sener and Koltun. Multi-Task Learning as Multi-Objective
        Optimization. NeurIPS 2018. https://arxiv.org/abs/1810.04650
        Desideri. Multiple-gradient descent algorithm (MGDA) for
        multiobjective optimization. Comptes Rendus Mathematique, 2012.
    """

    level = "gradient"
    gram_based = True

    def __init__(self, normalization: str = "none", max_iter: int = 250, **kwargs):
        super().__init__(**kwargs)
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"`normalization` must be one of {_NORMALIZATIONS}. Received: normalization={normalization!r}"
            )
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"`max_iter` must be a positive integer. Received: max_iter={max_iter!r}")
        self.normalization = normalization
        self.max_iter = max_iter

    def weights_from_gram(self, gram, losses, present, step):
        K = tf.cast(gram, tf.float64)
        if self.normalization != "none":
            norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(K), 0.0))
            loss_values = tf.abs(tf.cast(losses, tf.float64))
            if self.normalization == "l2":
                scale = norms
            elif self.normalization == "loss":
                scale = loss_values
            else:
                scale = loss_values * norms
            inverse = tf.where(scale > 0, 1.0 / tf.maximum(scale, 1e-300), tf.zeros_like(scale))
            K = K * inverse[:, None] * inverse[None, :]
        alpha = _solvers.min_norm_weights(K, present, max_iter=self.max_iter)
        return tf.cast(alpha, gram.dtype)

    def get_config(self):
        base_config = super().get_config()
        config = {"normalization": self.normalization, "max_iter": self.max_iter}
        return {**base_config, **config}
