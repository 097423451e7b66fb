"""Nash-MTL (Navon et al., 2022): the Nash bargaining solution, solved in the graph."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class NashMTL(Weighting):
    """Multi-task learning as a bargaining game (Nash-MTL).

    The update `d = G^T alpha` is the Nash bargaining solution among the
    tasks: the weights `alpha > 0` solve

        (K alpha)_t = 1 / alpha_t   for every task t    (K = G G^T),

    i.e. every task's directional derivative `g_t . d` is `1 / alpha_t`;
    consequently `|d|^2 = alpha^T K alpha = T`. These are the optimality
    conditions of the strictly convex problem
    `min_{alpha > 0} 1/2 alpha^T K alpha - sum_t log alpha_t`, which kmtl
    solves in the graph (no cvxpy) by damped Newton iterations: with
    Newton decrement `lambda`, the step `Delta / (1 + lambda)` of this
    self-concordant function never leaves `alpha > 0`, and once
    `lambda < 1/4` full Newton steps converge quadratically. The solve runs
    on `K` scaled to a unit mean diagonal, plus `ridge` times the identity
    (which keeps `alpha` finite when the gradients conflict exactly, e.g.
    `g_2 = -g_1`, where no solution exists and the update is 0), and
    `alpha` is scaled back.

    The paper's "update the weights every k steps" is the base argument
    `update_every`. Unlike the paper's code, kmtl neither caps `alpha`'s
    rescaling of the gradient nor clips the update norm; use the optimizer's
    `clipnorm` for that. Absent tasks take no part and get weight 0; if all
    present gradients are zero the weights are 0.

    Args:
        max_iter: Newton iteration cap (convergence usually takes < 15).
        ridge: Tikhonov term added to the normalized Gram matrix (> 0).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for a `max_iter` < 1 or a `ridge` outside (0, 1).

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import NashMTL
    >>> G = np.array([[2.0, 0.0], [0.0, 0.5]])  # orthogonal: alpha_t = 1 / |g_t|
    >>> np.round(NashMTL().aggregate(G).numpy(), 6)
    array([1., 1.])

    References:
        Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya.
        Multi-Task Learning as a Bargaining Game. ICML 2022.
        https://arxiv.org/abs/2202.01017
    """

    level = "gradient"
    gram_based = True

    def __init__(self, max_iter: int = 50, ridge: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"`max_iter` must be a positive integer. Received: max_iter={max_iter!r}")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 < float(ridge) < 1:
            raise ValueError(f"`ridge` must be a number in (0, 1). Received: ridge={ridge!r}")
        self.max_iter = max_iter
        self.ridge = float(ridge)

    def weights_from_gram(self, gram, losses, present, step):
        num_tasks = gram.shape[0]
        K, scale = _solvers.normalized_gram(gram, present)
        mask = tf.cast(present, tf.float64)
        # Absent tasks are decoupled (K_tt = 1, alpha_t = 1), then zeroed.
        K = K + tf.linalg.diag(1.0 - mask) + self.ridge * tf.eye(num_tasks, dtype=tf.float64)
        alpha0 = 1.0 / tf.sqrt(tf.linalg.diag_part(K))

        def body(i, alpha, decrement):
            grad = tf.linalg.matvec(K, alpha) - 1.0 / alpha
            hessian = K + tf.linalg.diag(1.0 / (alpha * alpha))
            delta = -tf.linalg.solve(hessian, grad[:, None])[:, 0]
            decrement = tf.sqrt(tf.maximum(-tf.tensordot(grad, delta, 1), 0.0))
            damping = tf.where(decrement < 0.25, tf.ones_like(decrement), 1.0 / (1.0 + decrement))
            alpha = tf.maximum(alpha + damping * delta, 1e-300)
            return i + 1, alpha, decrement

        def cond(i, alpha, decrement):
            return tf.logical_and(i < self.max_iter, decrement > 1e-10)

        start = (tf.constant(0), alpha0, tf.constant(1.0, tf.float64))
        _, alpha, _ = tf.while_loop(cond, body, start, maximum_iterations=self.max_iter)
        raw_trace = tf.reduce_sum(tf.linalg.diag_part(tf.cast(gram, tf.float64)) * mask)
        alpha = tf.where(raw_trace > 0, alpha * mask / tf.sqrt(scale), tf.zeros_like(alpha))
        return tf.cast(alpha, gram.dtype)

    def get_config(self):
        base_config = super().get_config()
        config = {"max_iter": self.max_iter, "ridge": self.ridge}
        return {**base_config, **config}
