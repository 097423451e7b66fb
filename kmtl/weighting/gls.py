"""Geometric loss strategy (GLS): the geometric mean of the task losses."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks
from kmtl.weighting.base import Weighting


@register("weighting", "gls")
class GLS(Weighting):
    """Geometric loss strategy: minimise the geometric mean of the losses.

        objective = (prod_{t present} L_t) ^ (1 / P)
                  = exp(mean_{t present} log(L_t + eps))

    over the `P` tasks present in the batch, computed in log space (no
    product of many small numbers). Its gradient is
    `sum_t objective / (P * L_t) * grad L_t`, so the logged task weight is
    `w_t = objective / (P * (L_t + eps))`, computed from the global loss
    values of the batch: tasks with small losses get large weights, and the
    direction does not depend on the scale of any one loss. `combine`
    returns the first-order form around those values,
    `objective(values) + sum_t w_t (L_t - values_t)`: the geometric mean
    itself when the losses are the global values, and exactly its gradient
    on every replica. Absent tasks are left out (no `log(0)`); if no task
    is present the total is 0.

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
    >>> losses, present = keras.ops.array([0.5, 2.0]), keras.ops.array([True, True])
    >>> total, weights, _ = strategy.combine(losses, losses, present, 0, strategy.state())
    >>> round(float(total), 5), [round(float(w), 5) for w in weights]  # sqrt(0.5 * 2.0)
    (1.0, [1.0, 0.25])

    References:
        Chennupati, Sistu, Yogamani and Rawashdeh. MultiNet++: Multi-Stream
        Feature Aggregation and Geometric Loss Strategy for Multi-Task
        Learning. CVPR Workshops 2019. https://arxiv.org/abs/1904.08492
    """

    level = "loss"

    def __init__(self, eps: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        self.eps = _checks.number(eps, "eps", low=0.0, low_open=True)

    def combine(self, losses, values, present, step, state):
        dtype = losses.dtype
        present = ops.cast(present, "bool")
        mask = ops.cast(present, dtype)
        values = ops.where(present, ops.cast(values, dtype), ops.zeros_like(losses))
        count = ops.sum(mask)
        shifted = ops.where(present, values + self.eps, ops.ones_like(values))
        logs = ops.where(present, ops.log(shifted), ops.zeros_like(shifted))
        mean_log = ops.sum(logs) / ops.maximum(count, 1.0)
        objective = ops.exp(mean_log) * ops.minimum(count, 1.0)
        weights = objective * mask / (ops.maximum(count, 1.0) * shifted)
        safe = ops.where(present, losses, ops.zeros_like(losses))
        total = objective + ops.sum(weights * (safe - values))
        return total, weights, {}

    def get_config(self):
        base_config = super().get_config()
        config = {"eps": self.eps}
        return {**base_config, **config}
