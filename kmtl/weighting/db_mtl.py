"""DB-MTL's loss-scale balancing (Lin et al., 2023): log-loss weighting."""

from __future__ import annotations

import math

import keras
from keras import ops

from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class DBMTL(Weighting):
    """Loss-scale balancing of DB-MTL: train on the sum of log-losses.

        total = sum_{t present} log(L_t + eps)

    Its gradient is `sum_t grad L_t / (L_t + eps)`, so every task's loss
    enters on the same (relative) scale whatever its units: the logged task
    weight is `1 / (L_t + eps)`. Absent tasks are left out (no `log(0)`).

    DB-MTL (Dual-Balancing) has a second, gradient-magnitude balancing
    part: it keeps an exponential moving average `g_t` of each task's
    gradient of `log L_t` with respect to the shared parameters and updates
    with `max_j ||g_j|| * sum_t g_t / ||g_t||`. That part is gradient-level
    and needs per-task gradient buffers the size of the shared parameters,
    which this loss-level strategy does not keep; it is not provided here.
    Combine this strategy with a gradient-level normaliser for the full
    method.

    Args:
        eps: constant added to every loss inside the log (> 0), so that a
            zero loss stays finite.
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for a non-positive or non-finite `eps`.

    Example:

    >>> import keras
    >>> from kmtl.weighting import DBMTL
    >>> strategy = DBMTL()
    >>> strategy.build(["digit", "parity"])
    >>> total = strategy.combine(keras.ops.array([0.5, 2.0]), keras.ops.array([True, True]), 0)
    >>> round(float(total), 5)  # log(0.5) + log(2.0)
    0.0

    References:
        Lin, Ye, Zhang, Yang, Xu and Kwok. Dual-Balancing for Multi-Task
        Learning. arXiv 2023. https://arxiv.org/abs/2308.12029
    """

    level = "loss"

    def __init__(self, eps: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"`eps` must be a finite number > 0. Received: eps={eps!r}")
        self.eps = float(eps)

    def combine(self, losses, present, step):
        mask = ops.cast(present, losses.dtype)
        # Absent tasks read log(1) = 0 instead of log(0 + eps).
        shifted = ops.where(present, losses + self.eps, ops.ones_like(losses))
        total = ops.sum(mask * ops.log(shifted))
        weights = mask / ops.stop_gradient(shifted)
        self.task_weights.assign(ops.cast(weights, self.task_weights.dtype))
        return total

    def get_config(self):
        base_config = super().get_config()
        config = {"eps": self.eps}
        return {**base_config, **config}
