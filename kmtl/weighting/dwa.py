"""Dynamic Weight Average (Liu et al., 2019)."""

from __future__ import annotations

import math

import keras
from keras import ops

from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class DWA(Weighting):
    """Dynamic Weight Average: weights from the rate of change of each loss.

    With `Lbar_t(k)` the mean training loss of task `t` over epoch `k`, the
    weights used during epoch `k` are

        r_t = Lbar_t(k-1) / Lbar_t(k-2)
        w_t = P * exp(r_t / temperature) / sum_{j present} exp(r_j / temperature)

    over the `P` tasks present in the batch (absent tasks get weight 0), and
    `total = sum_t w_t * L_t`. A task whose loss falls slowly gets more
    weight. While a task has fewer than two recorded epoch means its ratio
    is taken as 1, so during the first two epochs every weight is 1.

    State (non-trainable variables): the running sum and count of each
    task's loss in the current epoch, updated in `combine` from the
    replica-averaged loss values (an absent task, or a non-finite loss,
    records nothing), and the
    last two epoch means, shifted in `on_epoch_end`. The training loop must
    therefore call `on_epoch_end(epoch)` once at the end of every epoch (a
    task absent for a whole epoch keeps its previous means).

    Args:
        temperature: softness `T` of the softmax (> 0). The paper uses 2.
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for a non-positive or non-finite `temperature`.

    Example:

    >>> import keras
    >>> from kmtl.weighting import DWA
    >>> strategy = DWA(temperature=2.0)
    >>> strategy.build(["digit", "parity"])
    >>> losses, present = keras.ops.array([0.5, 2.0]), keras.ops.array([True, True])
    >>> float(strategy.combine(losses, present, 0))  # first epoch: weights 1
    2.5

    References:
        Liu, Johns and Davison. End-to-End Multi-Task Learning with
        Attention. CVPR 2019. https://arxiv.org/abs/1803.10704
    """

    level = "loss"

    def __init__(self, temperature: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(
                f"`temperature` must be a finite number > 0. Received: temperature={temperature!r}"
            )
        self.temperature = float(temperature)

    def build_state(self, num_tasks: int) -> None:
        shape = (num_tasks,)
        self.epoch_loss_sum = self.add_state("epoch_loss_sum", shape)
        self.epoch_loss_count = self.add_state("epoch_loss_count", shape)
        # last_means = Lbar(k-1), previous_means = Lbar(k-2); history = how
        # many epoch means were recorded (capped at 2).
        self.last_means = self.add_state("last_means", shape, "ones")
        self.previous_means = self.add_state("previous_means", shape, "ones")
        self.history = self.add_state("history", shape)

    def current_weights(self, present):
        """Weights `w_t` for the current epoch given the `[T]` presence mask."""
        mask = ops.cast(present, "float32")
        full = ops.cast(self.history >= 2.0, "float32")
        ratio = ops.divide_no_nan(self.last_means, self.previous_means)
        ratio = full * ratio + (1.0 - full) * ops.ones_like(ratio)
        logits = ratio / self.temperature
        # Softmax over present tasks only (finite fill so that an all-absent
        # batch gives zeros, not NaN).
        logits = ops.where(present, logits, ops.full_like(logits, -1e30))
        exp = ops.exp(logits - ops.max(logits)) * mask
        count = ops.sum(mask)
        return count * exp / ops.maximum(ops.sum(exp), 1e-30)

    def combine(self, losses, present, step):
        values = ops.cast(self.synced(ops.stop_gradient(losses)), "float32")
        # A non-finite loss (a step the model discards) is not recorded either.
        record = ops.logical_and(present, ops.isfinite(values))
        self.epoch_loss_sum.assign_add(ops.where(record, values, ops.zeros_like(values)))
        self.epoch_loss_count.assign_add(ops.cast(record, "float32"))
        weights = self.current_weights(present)
        self.task_weights.assign(weights)
        return ops.sum(ops.cast(weights, losses.dtype) * losses)

    def on_epoch_end(self, epoch: int) -> None:
        """Shifts the epoch means and resets the running sums.

        Must be called once at the end of every training epoch, outside
        `tf.function` or inside it.
        """
        count = self.epoch_loss_count
        seen = count > 0.0
        mean = ops.divide_no_nan(self.epoch_loss_sum, count)
        self.previous_means.assign(ops.where(seen, self.last_means, self.previous_means))
        self.last_means.assign(ops.where(seen, mean, self.last_means))
        self.history.assign(ops.where(seen, ops.minimum(self.history + 1.0, 2.0), self.history))
        self.epoch_loss_sum.assign(ops.zeros_like(self.epoch_loss_sum))
        self.epoch_loss_count.assign(ops.zeros_like(self.epoch_loss_count))

    def get_config(self):
        base_config = super().get_config()
        config = {"temperature": self.temperature}
        return {**base_config, **config}
