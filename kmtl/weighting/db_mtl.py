"""DB-MTL's loss-scale balancing (Lin et al., 2023): log-loss weighting."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks
from kmtl.weighting.base import Weighting


@register("weighting", "db_mtl")
class DBMTL(Weighting):
    """Loss-scale balancing of DB-MTL: train on the sum of log-losses.

        objective = sum_{t present} log(L_t + eps)

    Its gradient is `sum_t grad L_t / (L_t + eps)`, so every task's loss
    enters on the same (relative) scale whatever its units: the logged task
    weight is `w_t = 1 / (L_t + eps)`, computed from the global loss values
    of the batch. `combine` returns the first-order form of the objective
    around those values, `objective(values) + sum_t w_t (L_t - values_t)`:
    the objective itself when the losses are the global values, and exactly
    its gradient on every replica. Absent tasks are left out (no `log(0)`).

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
    >>> losses, present = keras.ops.array([0.5, 2.0]), keras.ops.array([True, True])
    >>> total, weights, _ = strategy.combine(losses, losses, present, 0, strategy.state())
    >>> round(float(total), 5), [round(float(w), 5) for w in weights]  # log(0.5) + log(2.0)
    (0.0, [2.0, 0.5])

    References:
        Lin, Ye, Zhang, Yang, Xu and Kwok. Dual-Balancing for Multi-Task
        Learning. arXiv 2023. https://arxiv.org/abs/2308.12029
    """

    level = "loss"

    def __init__(self, eps: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        self.eps = _checks.number(eps, "eps", low=0.0, low_open=True)

    def combine(self, losses, values, present, step, state):
        dtype = losses.dtype
        present = ops.cast(present, "bool")
        values = ops.where(present, ops.cast(values, dtype), ops.zeros_like(losses))
        # Absent tasks read log(1) = 0 instead of log(0 + eps).
        shifted = ops.where(present, values + self.eps, ops.ones_like(values))
        weights = ops.where(present, 1.0 / shifted, ops.zeros_like(shifted))
        objective = ops.sum(ops.where(present, ops.log(shifted), ops.zeros_like(shifted)))
        safe = ops.where(present, losses, ops.zeros_like(losses))
        total = objective + ops.sum(weights * (safe - values))
        return total, weights, {}

    def get_config(self):
        base_config = super().get_config()
        config = {"eps": self.eps}
        return {**base_config, **config}
