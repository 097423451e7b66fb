"""Dynamic Weight Average (Liu et al., 2019)."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks
from kmtl.weighting.base import Weighting


@register("weighting", "dwa")
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
    task's loss in the current epoch, which `combine` returns updated with
    the global loss values of the batch (an absent task, or a non-finite
    loss, records nothing; a rejected batch is not committed), and the last
    two epoch means, shifted in `on_epoch_end`. The training loop must
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
    >>> total, weights, new_state = strategy.combine(losses, losses, present, 0, strategy.state())
    >>> float(total), weights.numpy().tolist()  # first epoch: weights 1
    (2.5, [1.0, 1.0])
    >>> new_state["epoch_loss_sum"].numpy().tolist()
    [0.5, 2.0]

    References:
        Liu, Johns and Davison. End-to-End Multi-Task Learning with
        Attention. CVPR 2019. https://arxiv.org/abs/1803.10704
    """

    level = "loss"

    def __init__(self, temperature: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = _checks.number(temperature, "temperature", low=0.0, low_open=True)

    def build_state(self, num_tasks: int) -> None:
        shape = (num_tasks,)
        self.epoch_loss_sum = self.add_state("epoch_loss_sum", shape)
        self.epoch_loss_count = self.add_state("epoch_loss_count", shape)
        # last_means = Lbar(k-1), previous_means = Lbar(k-2); history = how
        # many epoch means were recorded (capped at 2).
        self.last_means = self.add_state("last_means", shape, "ones")
        self.previous_means = self.add_state("previous_means", shape, "ones")
        self.history = self.add_state("history", shape)

    def current_weights(self, present, state=None):
        """Weights `w_t` of the current epoch for the `[T]` presence mask.

        Pure: reads `state` (default: the current state).
        """
        state = self.state() if state is None else state
        present = ops.cast(present, "bool")
        mask = ops.cast(present, "float32")
        full = state["history"] >= 2.0
        ratio = ops.divide_no_nan(state["last_means"], state["previous_means"])
        ratio = ops.where(full, ratio, ops.ones_like(ratio))
        logits = ratio / self.temperature
        # Softmax over present tasks only (finite fill so that an all-absent
        # batch gives zeros, not NaN).
        logits = ops.where(present, logits, ops.full_like(logits, -1e30))
        exp = ops.exp(logits - ops.max(logits)) * mask
        return ops.sum(mask) * exp / ops.maximum(ops.sum(exp), 1e-30)

    def combine(self, losses, values, present, step, state):
        present = ops.cast(present, "bool")
        values = ops.cast(values, "float32")
        record = ops.logical_and(present, ops.isfinite(values))
        new_state = {
            "epoch_loss_sum": state["epoch_loss_sum"] + ops.where(record, values, ops.zeros_like(values)),
            "epoch_loss_count": state["epoch_loss_count"] + ops.cast(record, "float32"),
        }
        weights = self.current_weights(present, state)
        safe = ops.where(present, losses, ops.zeros_like(losses))
        return ops.sum(ops.cast(weights, losses.dtype) * safe), weights, new_state

    def on_epoch_end(self, epoch: int) -> None:
        """Shifts the epoch means and resets the running sums.

        Must be called once at the end of every training epoch (eagerly or
        inside `tf.function`).
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
