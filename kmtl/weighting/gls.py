"""Geometric loss strategy (GLS): the geometric mean of the task losses."""

from __future__ import annotations

import math

import keras
from keras import ops

from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class GLS(Weighting):
    """Geometric loss strategy: minimise the geometric mean of the losses.

        total = (prod_{t present} L_t) ^ (1 / P)
              = exp(mean_{t present} log(L_t + eps))

    over the `P` tasks present in the batch, computed in log space (no
    product of many small numbers). Its gradient is
    `sum_t total / (P * L_t) * grad L_t`, so the logged task weight is
    `total / (P * (L_t + eps))`: tasks with small losses get large weights,
    and the result does not depend on the scale of any one loss. Absent
    tasks are left out (no `log(0)`); if no task is present the total is 0.

    Args:
        eps: constant added to every loss inside the log (> 0).
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for a non-positive or non-finite `eps`.

    Example:

    >>> import keras
    >>> from kmtl.weighting import GLS
    >>> strategy = GLS()
    >>> strategy.build(["digit", "parity"])
    >>> total = strategy.combine(keras.ops.array([0.5, 2.0]), keras.ops.array([True, True]), 0)
    >>> round(float(total), 5)  # sqrt(0.5 * 2.0)
    1.0

    References:
        Chennupati, Sistu, Yogamani and Rawashdeh. MultiNet++: Multi-Stream
        Feature Aggregation and Geometric Loss Strategy for Multi-Task
        Learning. CVPR Workshops 2019. https://arxiv.org/abs/1904.08492
    """

    level = "loss"

    def __init__(self, eps: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"`eps` must be a finite number > 0. Received: eps={eps!r}")
        self.eps = float(eps)

    def combine(self, losses, present, step):
        mask = ops.cast(present, losses.dtype)
        count = ops.sum(mask)
        shifted = ops.where(present, losses + self.eps, ops.ones_like(losses))
        mean_log = ops.sum(mask * ops.log(shifted)) / ops.maximum(count, 1.0)
        total = ops.exp(mean_log) * ops.minimum(count, 1.0)
        weights = ops.stop_gradient(total) * mask / (ops.maximum(count, 1.0) * ops.stop_gradient(shifted))
        self.task_weights.assign(ops.cast(weights, self.task_weights.dtype))
        return total

    def get_config(self):
        base_config = super().get_config()
        config = {"eps": self.eps}
        return {**base_config, **config}
