"""Fast Adaptive Multitask Optimization (Liu et al., 2023)."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks
from kmtl.weighting.base import Weighting

OPTIMIZERS = ("adam", "sgd")
UPDATES = ("previous_batch", "same_batch")
_ADAM = (0.9, 0.999, 1e-8)  # beta_1, beta_2, epsilon: torch.optim.Adam's defaults (the authors' code)


def _masked_softmax(logits, mask):
    logits = ops.where(mask > 0, logits, ops.full_like(logits, -1e30))
    exp = ops.exp(logits - ops.max(logits)) * mask
    return exp / ops.maximum(ops.sum(exp), 1e-30)


@register("weighting", "famo")
class FAMO(Weighting):
    """FAMO: balances the rate at which every task's log-loss decreases.

    FAMO keeps task logits `xi` (state, initialised to 0) and weights
    `z = softmax(xi)` over the tasks present in the batch. The step's
    update direction is `sum_t c_t * grad log L_t` with
    `c_t = z_t / sum_j (z_j / L_j)`, i.e. the gradient of a loss whose
    weights (the logged task weights) are

        w_t = (z_t / L_t) / sum_j (z_j / L_j)        (they sum to 1).

    `combine` computes `w` from the global loss values and returns
    `sum_t w_t * L_t`: its gradient is exactly the FAMO direction, and its
    value is (up to `eps`) the `z`-weighted harmonic mean of the losses.
    (Losses are offset by `eps` in `1 / L` and `log L`.)

    The logits learn from the decrease of the log-losses over one step,
    `delta_t = log L_t(before) - log L_t(after)`: their gradient is
    `d = J_softmax(xi)^T delta`, i.e. `d_t = z_t (delta_t - sum_j z_j delta_j)`,
    plus weight decay `gamma * xi`, and `xi` takes one optimizer step with
    learning rate `learning_rate`: Adam (as in the authors' code, whose
    `torch.optim.Adam(weight_decay=gamma)` adds `gamma * xi` to the
    gradient in the same way) or plain gradient descent
    `xi <- xi - lr (d + gamma xi)` (the paper's Algorithm 1). A task that
    improved faster than the weighted average loses weight.

    Where "before" and "after" come from (`update`):

    * `"previous_batch"` (default): at the start of every step, from the
      previous step's loss values (the previous batch) to this step's
      (this batch), then this step's weights use the updated logits. This
      costs no extra forward pass; the change it sees mixes the effect of
      the update with the change of batch.
    * `"same_batch"`: the authors' convention (their code, and LibMTL's
      trainer, evaluate the same batch again after the optimizer step).
      `combine` only reads the logits; the training step then runs one
      extra forward pass on the same batch after the update and calls
      `after_step(values_before, values_after, ...)`, which returns the
      updated logits. `needs_losses_after_step` is True in this mode only.

    Masked tasks: the update only involves the tasks present at both ends
    (softmax restricted to them); the other tasks' logits and Adam moments
    are untouched, and an absent task gets weight 0. A task whose loss is
    not finite is treated as absent.

    Args:
        learning_rate: step size of the logit update (the paper's `beta`;
            0.025 as in the authors' code).
        weight_decay: weight decay of the logits (the paper's `gamma`; the
            authors use 1e-3 or 1e-2 depending on the benchmark).
        optimizer: `"adam"` (authors' code) or `"sgd"` (paper's Algorithm 1).
        eps: small constant added to the losses before `1/L` and `log L`.
        update: `"previous_batch"` or `"same_batch"` (see above).
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for a non-positive `learning_rate` or `eps`, a negative
            `weight_decay`, or an unknown `optimizer` or `update`.

    Example:

    >>> import keras
    >>> from kmtl.weighting import FAMO
    >>> strategy = FAMO()
    >>> strategy.build(["digit", "parity"])
    >>> losses, present = keras.ops.array([1.0, 3.0]), keras.ops.array([True, True])
    >>> _, weights, _ = strategy.combine(losses, losses, present, 0, strategy.state())
    >>> [round(float(w), 4) for w in weights]  # z = (0.5, 0.5)
    [0.75, 0.25]

    References:
        Liu, Liang, Shen, Li, Chen, Ling and Ke. FAMO: Fast Adaptive
        Multitask Optimization. NeurIPS 2023.
        https://arxiv.org/abs/2306.03792 (code:
        https://github.com/Cranial-XIX/FAMO)
    """

    level = "loss"
    #: True if the training step must call `after_step` (`update="same_batch"`).
    needs_losses_after_step = False

    def __init__(
        self,
        learning_rate: float = 0.025,
        weight_decay: float = 1e-3,
        optimizer: str = "adam",
        eps: float = 1e-8,
        update: str = "previous_batch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.learning_rate = _checks.number(learning_rate, "learning_rate", low=0.0, low_open=True)
        self.weight_decay = _checks.number(weight_decay, "weight_decay", low=0.0)
        self.eps = _checks.number(eps, "eps", low=0.0, low_open=True)
        self.optimizer = _checks.choice(optimizer, "optimizer", OPTIMIZERS)
        self.update = _checks.choice(update, "update", UPDATES)
        self.needs_losses_after_step = update == "same_batch"

    def build_state(self, num_tasks: int) -> None:
        shape = (num_tasks,)
        self.logits = self.add_state("logits", shape)
        # Adam moments and per-task step counts (tasks update independently).
        self.adam_m = self.add_state("adam_m", shape)
        self.adam_v = self.add_state("adam_v", shape)
        self.adam_steps = self.add_state("adam_steps", shape)
        if self.update == "previous_batch":
            self.previous_losses = self.add_state("previous_losses", shape, "ones")
            # 1.0 where the task was present in the previous step.
            self.previous_present = self.add_state("previous_present", shape)

    def _logit_step(self, state, delta, pair):
        """One optimizer step of the logits from `delta` on the tasks where `pair` is 1.

        Returns the new `logits` (and Adam) state.
        """
        xi = state["logits"]
        z = _masked_softmax(xi, pair)
        grad = (z * (delta - ops.sum(z * delta)) + self.weight_decay * xi) * pair
        active = pair > 0
        if self.optimizer == "sgd":
            return {"logits": ops.where(active, xi - self.learning_rate * grad, xi)}
        beta_1, beta_2, epsilon = _ADAM
        steps = state["adam_steps"] + pair
        m = ops.where(active, beta_1 * state["adam_m"] + (1 - beta_1) * grad, state["adam_m"])
        v = ops.where(active, beta_2 * state["adam_v"] + (1 - beta_2) * grad * grad, state["adam_v"])
        safe_steps = ops.maximum(steps, 1.0)
        m_hat = m / (1 - ops.power(beta_1, safe_steps))
        v_hat = v / (1 - ops.power(beta_2, safe_steps))
        new_xi = xi - self.learning_rate * m_hat / (ops.sqrt(v_hat) + epsilon)
        return {"logits": ops.where(active, new_xi, xi), "adam_m": m, "adam_v": v, "adam_steps": steps}

    def _log_decrease(self, before, after, pair):
        delta = ops.log(before + self.eps) - ops.log(after + self.eps)
        return ops.where(pair > 0, delta, ops.zeros_like(delta))

    def combine(self, losses, values, present, step, state):
        values = ops.cast(values, "float32")
        # A task with a non-finite loss (a step the model discards) is
        # treated as absent, so the state stays finite.
        present = ops.logical_and(ops.cast(present, "bool"), ops.isfinite(values))
        values = ops.where(present, values, ops.ones_like(values))
        mask = ops.cast(present, "float32")
        new_state = {}
        logits = state["logits"]
        if self.update == "previous_batch":
            pair = mask * state["previous_present"]
            delta = self._log_decrease(state["previous_losses"], values, pair)
            new_state = self._logit_step(state, delta, pair)
            logits = new_state["logits"]
            new_state["previous_losses"] = ops.where(present, values, state["previous_losses"])
            new_state["previous_present"] = mask
        inverse = _masked_softmax(logits, mask) / (values + self.eps)
        weights = inverse / ops.maximum(ops.sum(inverse), 1e-30)
        safe = ops.where(present, losses, ops.zeros_like(losses))
        return ops.sum(ops.cast(weights, losses.dtype) * safe), weights, new_state

    def after_step(self, values_before, values_after, present, step, state):
        """`update="same_batch"`: the logit update from one batch's losses before and after the step.

        Pure. `values_before` are the global loss values the step's
        `combine` saw, `values_after` those of the same batch evaluated
        after the optimizer update, `present` the step's mask. Tasks absent,
        or with a non-finite value on either side, are left untouched.

        Returns:
            The new state (`logits` and, with Adam, its moments and counts).

        Raises:
            ValueError: if the strategy was built with `update="previous_batch"`
                (its logits are updated in `combine`).
        """
        if not self.needs_losses_after_step:
            raise ValueError(
                "`after_step` is only used with update='same_batch'; this FAMO updates its logits in "
                f"`combine`. Received: update={self.update!r}"
            )
        before = ops.cast(values_before, "float32")
        after = ops.cast(values_after, "float32")
        pair = ops.logical_and(
            ops.cast(present, "bool"), ops.logical_and(ops.isfinite(before), ops.isfinite(after))
        )
        before = ops.where(pair, before, ops.ones_like(before))
        after = ops.where(pair, after, ops.ones_like(after))
        mask = ops.cast(pair, "float32")
        return self._logit_step(state, self._log_decrease(before, after, mask), mask)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "optimizer": self.optimizer,
            "eps": self.eps,
            "update": self.update,
        }
        return {**base_config, **config}
