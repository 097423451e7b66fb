"""Gradient Vaccine (Wang et al., 2021): steer pairwise gradient similarity towards its EMA."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class GradVac(Weighting):
    """Gradient Vaccine: adaptive pairwise cosine-similarity targets.

    The strategy keeps, for every ordered task pair `(i, j)`, a target
    cosine similarity `phi_hat_ij`, an exponential moving average
    (`phi_hat <- (1 - beta) phi_hat + beta phi`, started at 0) of the
    observed similarities. Every task gradient `g_i` visits the other tasks
    `j` in a random order; with `phi = cos(g_i^GV, g_j)`, if
    `phi < phi_hat_ij` it is moved towards `g_j` just enough to reach the
    target:

        g_i^GV <- g_i^GV + |g_i^GV| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                           / (|g_j| sqrt(1 - phi_hat^2)) * g_j

    and the target is updated with `phi`. The update is `sum_i g_i^GV`.

    Like PCGrad, every `g_i^GV` is a linear combination of the task
    gradients, so kmtl runs the procedure on its coefficients with the
    Gram matrix only, over all shared parameters together (the paper also
    describes per-layer groups; LibMTL's default is the whole model, as here).
    Random orders come from a stateless generator keyed by `(seed, draw
    counter)`, as in `PCGrad`. Pairs with an absent task or a zero gradient
    are skipped and their targets are not updated.

    Args:
        beta: EMA rate of the targets, in (0, 1] (0.01 in the paper).
        seed: integer seed of the random orders; `None` draws one at
            construction (kept in the config).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for a `beta` outside (0, 1] or a bad `seed`.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import GradVac
    >>> strategy = GradVac(beta=0.5, seed=0)
    >>> d = strategy.aggregate(np.array([[1.0, 0.0], [-1.0, 1.0]]))
    >>> np.round(strategy.targets.numpy(), 4)  # (1 - 0.5) * 0 + 0.5 * cos
    array([[ 0.    , -0.3536],
           [-0.3536,  0.    ]], dtype=float32)

    References:
        Wang, Tsvetkov, Firat and Cao. Gradient Vaccine: Investigating and
        Improving Multi-task Optimization in Massively Multilingual Models.
        ICLR 2021. https://arxiv.org/abs/2010.05874
    """

    level = "gradient"
    gram_based = True

    def __init__(self, beta: float = 0.01, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < float(beta) <= 1:
            raise ValueError(f"`beta` must be a number in (0, 1]. Received: beta={beta!r}")
        self.beta = float(beta)
        self.seed = _solvers.check_seed(seed)

    def build_state(self, num_tasks: int) -> None:
        self.targets = self.add_state("targets", (num_tasks, num_tasks), "zeros")
        self.draws = self.add_state("draws", (), "zeros", dtype="int64")

    def weights_from_gram(self, gram, losses, present, step):
        num_tasks = gram.shape[0]
        K, _ = _solvers.normalized_gram(gram, present)
        mask = tf.cast(present, tf.float64)
        orders = _solvers.random_orders(_solvers.next_key(self.seed, self.draws), num_tasks)
        targets = tf.cast(self.targets, tf.float64)
        coefficients = tf.eye(num_tasks, dtype=tf.float64)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(K), 0.0))
        tasks = tf.range(num_tasks, dtype=orders.dtype)
        for k in range(num_tasks):
            partner = orders[:, k]
            onehot = tf.one_hot(partner, num_tasks, dtype=tf.float64)
            ck = tf.matmul(coefficients, K)
            dots = tf.reduce_sum(ck * onehot, axis=1)
            own_norm = tf.sqrt(tf.maximum(tf.reduce_sum(ck * coefficients, axis=1), 0.0))
            partner_norm = tf.gather(norms, partner)
            valid = (
                (partner != tasks)
                & present
                & tf.gather(present, partner)
                & (own_norm > 1e-150)
                & (partner_norm > 1e-150)
            )
            cosine = tf.clip_by_value(dots / tf.maximum(own_norm * partner_norm, 1e-300), -1.0, 1.0)
            target = tf.reduce_sum(targets * onehot, axis=1)
            sin_target = tf.sqrt(tf.maximum(1.0 - target * target, 1e-12))
            sin_cosine = tf.sqrt(tf.maximum(1.0 - cosine * cosine, 0.0))
            step_size = own_norm * (target * sin_cosine - cosine * sin_target)
            step_size = step_size / (tf.maximum(partner_norm, 1e-300) * sin_target)
            move = valid & (cosine < target)
            coefficients = coefficients + tf.where(move, step_size, 0.0)[:, None] * onehot
            update = tf.where(valid, self.beta * (cosine - target), 0.0)
            targets = targets + update[:, None] * onehot
        self.targets.assign(tf.cast(targets, self.targets.dtype))
        alpha = tf.linalg.matvec(coefficients, mask, transpose_a=True) * mask
        return tf.cast(alpha, gram.dtype)

    def get_config(self):
        base_config = super().get_config()
        config = {"beta": self.beta, "seed": self.seed}
        return {**base_config, **config}
