"""PCGrad (Yu et al., 2020): project conflicting gradients, computed on the Gram matrix."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class PCGrad(Weighting):
    """Projecting Conflicting Gradients ("gradient surgery").

    Every task gradient `g_i` is visited against the other tasks `j` in a
    random order; whenever the current `g_i^PC` conflicts with the original
    `g_j` (`g_i^PC . g_j < 0`) its component along `g_j` is removed:

        g_i^PC <- g_i^PC - (g_i^PC . g_j) / |g_j|^2 * g_j

    and the update is the sum `sum_i g_i^PC`. Non-conflicting gradients are
    left alone, so without conflicts PCGrad is the plain sum.

    Every `g_i^PC` stays a linear combination `sum_k C_ik g_k` of the task
    gradients, so kmtl runs the surgery on the coefficients `C` using only
    the `T x T` Gram matrix (`g_a . g_b` is `K_ab`, `(C K)_ij` is
    `g_i^PC . g_j`) and returns `alpha = sum_i C_i` (`update = G^T alpha`);
    the gradients themselves are touched once, in the final combination.
    The projections of all tasks run side by side, so one pass costs `T`
    small steps.

    The random orders (one permutation per task per step) are drawn from a
    stateless generator keyed by `(seed, draw counter)`: reproducible for a
    seed, identical on every replica, and continued after a reload. With two
    tasks the order does not matter. Absent tasks take no part and get weight
    0; a zero gradient never triggers a projection.

    Args:
        seed: integer seed of the random orders. `None` draws one at
            construction (kept in the config).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for a `seed` that is not a non-negative integer.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import PCGrad
    >>> G = np.array([[1.0, 0.0], [-1.0, 1.0]])  # conflicting: g1 . g2 = -1
    >>> PCGrad(seed=0).aggregate(G).numpy()
    array([0.5, 1.5])

    References:
        Yu, Kumar, Gupta, Levine, Hausman and Finn. Gradient Surgery for
        Multi-Task Learning. NeurIPS 2020. https://arxiv.org/abs/2001.06782
    """

    level = "gradient"
    gram_based = True

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = _solvers.check_seed(seed)

    def build_state(self, num_tasks: int) -> None:
        self.draws = self.add_state("draws", (), "zeros", dtype="int64")

    def weights_from_gram(self, gram, losses, present, step):
        num_tasks = gram.shape[0]
        K, _ = _solvers.normalized_gram(gram, present)
        mask = tf.cast(present, tf.float64)
        orders = _solvers.random_orders(_solvers.next_key(self.seed, self.draws), num_tasks)
        coefficients = tf.eye(num_tasks, dtype=tf.float64)
        squared_norms = tf.linalg.diag_part(K)
        tasks = tf.range(num_tasks, dtype=orders.dtype)
        for k in range(num_tasks):
            partner = orders[:, k]  # task i is projected against task partner[i]
            onehot = tf.one_hot(partner, num_tasks, dtype=tf.float64)
            dots = tf.reduce_sum(tf.matmul(coefficients, K) * onehot, axis=1)
            partner_norm = tf.gather(squared_norms, partner)
            conflict = (dots < 0) & (partner != tasks) & (partner_norm > 0)
            coef = tf.where(conflict, dots / tf.maximum(partner_norm, 1e-300), tf.zeros_like(dots))
            coefficients = coefficients - coef[:, None] * onehot
        alpha = tf.linalg.matvec(coefficients, mask, transpose_a=True) * mask
        return tf.cast(alpha, gram.dtype)

    def get_config(self):
        base_config = super().get_config()
        config = {"seed": self.seed}
        return {**base_config, **config}
