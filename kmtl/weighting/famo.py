"""Fast Adaptive Multitask Optimization (Liu et al., 2023)."""

from __future__ import annotations

import math

import keras
from keras import ops

from kmtl.weighting.base import Weighting

_OPTIMIZERS = ("adam", "sgd")


def _check_number(value, argument: str, minimum: float, strict: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"`{argument}` must be a finite number {bound}. Received: {argument}={value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="kmtl")
class FAMO(Weighting):
    """FAMO: balances the rate at which every task's log-loss decreases.

    FAMO keeps task logits `xi` (state, initialised to 0) and weights
    `z = softmax(xi)` over the tasks present in the batch. The step's
    update direction is `sum_t c_t * grad log L_t` with
    `c_t = z_t / sum_j (z_j / L_j)`, i.e. the gradient of a loss whose
    weights (the logged task weights) are

        w_t = (z_t / L_t) / sum_j (z_j / L_j)        (they sum to 1).

    `combine` returns `sum_t stop_gradient(w_t) * L_t`: its gradient is
    exactly the FAMO direction, and its value is the `z`-weighted harmonic
    mean of the losses. (Losses are offset by `eps` in `1 / L`.)

    The logits are updated at the start of every step from the decrease of
    the log-losses since the previous step,
    `delta_t = log L_t(prev) - log L_t(now)`: their gradient is
    `d = J_softmax(xi)^T delta`, i.e. `d_t = z_t (delta_t - sum_j z_j delta_j)`,
    plus weight decay `gamma * xi`, and `xi` takes one optimizer step with
    learning rate `learning_rate`: Adam (as in the authors' code) or plain
    gradient descent `xi <- xi - lr (d + gamma xi)` (the paper's
    Algorithm 1). A task that improved faster than the weighted average
    loses weight. Here "previous step" means the previous call of `combine`
    (the previous batch), as in LibMTL, so FAMO costs no extra forward pass.

    Masked tasks: the update only involves the tasks present in both
    steps (softmax restricted to them); the other tasks' logits and Adam
    moments are untouched, and an absent task gets weight 0. A task whose
    loss is not finite is treated as absent.

    Args:
        learning_rate: step size of the logit update (the paper's `beta`).
        weight_decay: weight decay of the logits (the paper's `gamma`).
        optimizer: `"adam"` (authors' code) or `"sgd"` (paper's Algorithm 1).
        eps: small constant added to the losses before `1/L` and `log L`.
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for a non-positive `learning_rate` or `eps`, a negative
            `weight_decay`, or an unknown `optimizer`.

    Example:

    >>> import keras
    >>> from kmtl.weighting import FAMO
    >>> strategy = FAMO()
    >>> strategy.build(["digit", "parity"])
    >>> total = strategy.combine(keras.ops.array([1.0, 3.0]), keras.ops.array([True, True]), 0)
    >>> [round(float(w), 4) for w in strategy.task_weights.numpy()]  # z = (0.5, 0.5)
    [0.75, 0.25]

    References:
        Liu, Liang, Shen, Li, Chen, Ling and Ke. FAMO: Fast Adaptive
        Multitask Optimization. NeurIPS 2023.
        https://arxiv.org/abs/2306.03792
    """

    level = "loss"

    def __init__(
        self,
        learning_rate: float = 0.025,
        weight_decay: float = 1e-3,
        optimizer: str = "adam",
        eps: float = 1e-8,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.learning_rate = _check_number(learning_rate, "learning_rate", 0.0, strict=True)
        self.weight_decay = _check_number(weight_decay, "weight_decay", 0.0, strict=False)
        self.eps = _check_number(eps, "eps", 0.0, strict=True)
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {_OPTIMIZERS}. Received: optimizer={optimizer!r}")
        self.optimizer = optimizer

    def build_state(self, num_tasks: int) -> None:
        shape = (num_tasks,)
        self.logits = self.add_state("logits", shape)
        self.previous_losses = self.add_state("previous_losses", shape, "ones")
        # 1.0 where the task was present in the previous step.
        self.previous_present = self.add_state("previous_present", shape)
        # Adam moments and per-task step counts (tasks update independently).
        self.adam_m = self.add_state("adam_m", shape)
        self.adam_v = self.add_state("adam_v", shape)
        self.adam_steps = self.add_state("adam_steps", shape)

    @staticmethod
    def _masked_softmax(logits, mask):
        logits = ops.where(mask > 0, logits, ops.full_like(logits, -1e30))
        exp = ops.exp(logits - ops.max(logits)) * mask
        return exp / ops.maximum(ops.sum(exp), 1e-30)

    def _update_logits(self, values, mask):
        """One optimizer step of `xi` from the current loss values."""
        pair = mask * self.previous_present
        delta = ops.log(self.previous_losses + self.eps) - ops.log(values + self.eps)
        delta = ops.where(pair > 0, delta, ops.zeros_like(delta))
        z = self._masked_softmax(self.logits, pair)
        grad = z * (delta - ops.sum(z * delta)) + self.weight_decay * self.logits
        grad = grad * pair
        xi = self.logits
        if self.optimizer == "sgd":
            new_xi = xi - self.learning_rate * grad
        else:
            beta_1, beta_2, epsilon = 0.9, 0.999, 1e-8
            steps = self.adam_steps + pair
            m = ops.where(pair > 0, beta_1 * self.adam_m + (1 - beta_1) * grad, self.adam_m)
            v = ops.where(pair > 0, beta_2 * self.adam_v + (1 - beta_2) * grad * grad, self.adam_v)
            safe_steps = ops.maximum(steps, 1.0)
            m_hat = m / (1 - ops.power(beta_1, safe_steps))
            v_hat = v / (1 - ops.power(beta_2, safe_steps))
            new_xi = xi - self.learning_rate * m_hat / (ops.sqrt(v_hat) + epsilon)
            self.adam_m.assign(m)
            self.adam_v.assign(v)
            self.adam_steps.assign(steps)
        self.logits.assign(ops.where(pair > 0, new_xi, xi))

    def combine(self, losses, present, step):
        values = ops.cast(self.synced(ops.stop_gradient(losses)), "float32")
        # A task with a non-finite loss (a step the model discards) is
        # treated as absent, so the state stays finite.
        present = ops.logical_and(present, ops.isfinite(values))
        values = ops.where(present, values, ops.ones_like(values))
        mask = ops.cast(present, "float32")
        self._update_logits(values, mask)
        self.previous_losses.assign(ops.where(present, values, self.previous_losses))
        self.previous_present.assign(mask)
        z = self._masked_softmax(self.logits, mask)
        inverse = z / (values + self.eps)
        weights = inverse / ops.maximum(ops.sum(inverse), 1e-30)
        self.task_weights.assign(weights)
        return ops.sum(ops.cast(weights, losses.dtype) * losses)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "optimizer": self.optimizer,
            "eps": self.eps,
        }
        return {**base_config, **config}
