"""IMTL-G (Liu et al., 2021): the update with equal projections onto every task gradient."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class IMTL(Weighting):
    """Impartial multi-task learning, gradient balance (IMTL-G).

    Finds the update `d = sum_t alpha_t g_t` with `sum_t alpha_t = 1` whose
    projection onto every unit task gradient `u_t = g_t / |g_t|` is the
    same: `d . u_1 = d . u_2 = ... = d . u_T`. The paper solves it in closed
    form as `alpha_{2:T} = g_1 U^T (D U^T)^-1` with `D_t = g_1 - g_t` and
    `U_t = u_1 - u_t`; kmtl solves the equivalent `(T + 1) x (T + 1)` linear
    system in `alpha` and the common projection `c`,

        sum_t alpha_t K_ts / |g_s| - c = 0   for every task s,
        sum_t alpha_t = 1,

    built from the Gram matrix alone, with a pseudo-inverse (in float64), so
    that identical gradients (an underdetermined system) give the minimum
    norm weights instead of a failure. Absent tasks and tasks whose gradient
    is exactly zero have no direction: they take no part in the equal
    projection conditions and get weight 0. If no task has a non-zero
    gradient, the present tasks get equal weights (the update is zero
    anyway).

    Args:
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

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

    def weights_from_gram(self, gram, losses, present, step):
        num_tasks = gram.shape[0]
        K = tf.cast(gram, tf.float64)
        scale = tf.reduce_max(tf.abs(tf.linalg.diag_part(K)))
        K = K / tf.where(scale > 0, scale, tf.ones_like(scale))
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(K), 0.0))
        valid = tf.logical_and(present, norms > 0)
        valid_f = tf.cast(valid, tf.float64)
        inverse_norms = tf.where(valid, 1.0 / tf.maximum(norms, 1e-300), tf.zeros_like(norms))
        # Row s: projection of d onto u_s minus c (or alpha_s = 0 for an invalid task).
        projection_rows = tf.transpose(K) * inverse_norms[:, None]
        identity = tf.eye(num_tasks, dtype=tf.float64)
        rows = tf.where(valid[:, None], projection_rows, identity)
        c_column = -valid_f[:, None]
        top = tf.concat([rows, c_column], axis=1)
        bottom = tf.concat([valid_f, tf.zeros((1,), tf.float64)], axis=0)[None, :]
        system = tf.concat([top, bottom], axis=0)
        rhs = tf.concat([tf.zeros((num_tasks,), tf.float64), tf.ones((1,), tf.float64)], axis=0)
        solution = tf.linalg.matvec(tf.linalg.pinv(system), rhs)
        alpha = solution[:num_tasks] * valid_f
        present_f = tf.cast(present, tf.float64)
        fallback = present_f / tf.maximum(tf.reduce_sum(present_f), 1.0)
        alpha = tf.where(tf.reduce_any(valid), alpha, fallback)
        return tf.cast(alpha, gram.dtype)
