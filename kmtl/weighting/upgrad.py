"""UPGrad (Quinton & Rey, 2024): average of the task gradients projected onto the dual cone."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class UPGrad(Weighting):
    """Unconflicting projection of gradients.

    Each task gradient `g_i` is projected onto the dual cone of the task
    gradients, `{x : g_t . x >= 0 for every t}` (the directions that
    conflict with no task), and the projections are averaged. By duality
    the projection of `g_i` is `G^T (e_i + lambda_i)` where

        lambda_i = argmin_{lambda >= 0} 1/2 lambda^T K lambda + lambda^T K e_i,

    a small non-negative quadratic program on the Gram matrix `K`, solved in
    the graph by `kmtl.weighting._solvers.nonnegative_qp` (exact for up to
    10 tasks). The weights are `alpha = mean_i (e_i + lambda_i)` over the
    present tasks, and the update `G^T alpha` has a non-negative inner product
    with every task gradient. When no task conflicts, every `lambda_i` is 0
    and UPGrad is the mean gradient.

    Args:
        max_exact_tasks: number of tasks up to which the quadratic programs
            are solved by exact enumeration of their support (2^T small
            systems in one batched solve); above it an accelerated projected
            gradient method with an exact final polish is used.
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for a `max_exact_tasks` outside [0, 14].

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import UPGrad
    >>> G = np.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> UPGrad().aggregate(G).numpy()
    array([0.25, 0.75])

    References:
        Quinton and Rey. Jacobian Descent for Multi-Objective Optimization.
        arXiv 2024. https://arxiv.org/abs/2406.16232
    """

    level = "gradient"
    gram_based = True

    def __init__(self, max_exact_tasks: int = 10, **kwargs):
        super().__init__(**kwargs)
        if (
            isinstance(max_exact_tasks, bool)
            or not isinstance(max_exact_tasks, int)
            or not 0 <= max_exact_tasks <= 14
        ):
            raise ValueError(
                f"`max_exact_tasks` must be an integer in [0, 14]. Received: max_exact_tasks={max_exact_tasks!r}"
            )
        self.max_exact_tasks = max_exact_tasks

    def weights_from_gram(self, gram, losses, present, step):
        K, _ = _solvers.normalized_gram(gram, present)
        mask = tf.cast(present, tf.float64)
        lambdas = _solvers.nonnegative_qp(K, K * mask[None, :], present, max_exact_tasks=self.max_exact_tasks)
        count = tf.maximum(tf.reduce_sum(mask), 1.0)
        alpha = (mask + tf.linalg.matvec(lambdas, mask)) * mask / count
        return tf.cast(alpha, gram.dtype)

    def get_config(self):
        base_config = super().get_config()
        config = {"max_exact_tasks": self.max_exact_tasks}
        return {**base_config, **config}
