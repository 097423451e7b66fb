"""GradNorm (Chen et al., 2018): learn task weights that balance gradient norms."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks
from kmtl.weighting.base import Weighting


@register("weighting", "gradnorm")
class GradNorm(Weighting):
    """Gradient normalization: task weights that equalise the tasks' training rates.

    Each task has a weight `w_t` (state, starting at 1). With the task
    gradient norms `n_t = sqrt(K_tt)` (from the Gram matrix of the shared
    gradients; the paper uses the last shared layer), the weighted norms
    `G_t = w_t n_t`, their mean `G_bar`, the loss ratios
    `r_t = (L_t / L_t(0)) / mean_s (L_s / L_s(0))` and the asymmetry
    `alpha`, GradNorm minimises

        L_grad(w) = sum_t |G_t - G_bar r_t^alpha|

    over `w` with the target `G_bar r_t^alpha` held constant. Its gradient
    is `sign(G_t - G_bar r_t^alpha) n_t`; kmtl divides it by the mean
    gradient norm (so `learning_rate` does not depend on the scale of the
    gradients), takes one step of `learning_rate` on `w`, keeps `w` positive
    and renormalises it so that the weights of the present tasks keep their
    sum (`sum_t w_t = T` overall). The update of the model uses the weights
    from before the step: `alpha_t = w_t` (hence a gradient-level strategy
    in kmtl: it needs the per-task gradient norms). A task whose loss grows
    relative to the others (slow training, `r_t > 1`) gets a larger weight.

    `L_t(0)` is the first global loss value seen for task `t` (recorded the
    first time the task is present). Absent tasks have weight 0 in the
    update and their `w_t` and `L_t(0)` are left unchanged.

    Args:
        alpha: asymmetry `alpha >= 0` (1.5 in the paper; 0 equalises the
            gradient norms).
        learning_rate: step size of the weight update (> 0).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Raises:
        ValueError: for a negative or non-finite `alpha` or a non-positive
            `learning_rate`.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import GradNorm
    >>> strategy = GradNorm(learning_rate=0.1)
    >>> strategy.build(["digit", "parity"])
    >>> G = np.array([[1.0, 0.0], [0.0, 4.0]], "float32")
    >>> alpha, new_state = strategy.weights_from_gram(G @ G.T, np.ones(2, "float32"),
    ...                                               np.array([True, True]), 0, strategy.state())
    >>> alpha.numpy(), np.round(new_state["learned_weights"].numpy(), 4)  # task 0 has the smaller norm
    (array([1., 1.], dtype=float32), array([1.1064, 0.8936], dtype=float32))

    References:
        Chen, Badrinarayanan, Lee and Rabinovich. GradNorm: Gradient
        Normalization for Adaptive Loss Balancing in Deep Multitask
        Networks. ICML 2018. https://arxiv.org/abs/1711.02257
    """

    level = "gradient"
    gram_based = True

    def __init__(self, alpha: float = 1.5, learning_rate: float = 0.025, **kwargs):
        super().__init__(**kwargs)
        self.alpha = _checks.number(alpha, "alpha", low=0.0)
        self.learning_rate = _checks.number(learning_rate, "learning_rate", low=0.0, low_open=True)

    def build_state(self, num_tasks: int) -> None:
        self.learned_weights = self.add_state("learned_weights", (num_tasks,), "ones")
        self.initial_losses = self.add_state("initial_losses", (num_tasks,), "zeros")
        self.seen = self.add_state("seen", (num_tasks,), "zeros")

    def weights_from_gram(self, gram, values, present, step, state):
        gram = ops.convert_to_tensor(gram)
        present = ops.cast(present, "bool")
        mask = ops.cast(present, "float32")
        values = ops.where(present, ops.cast(values, "float32"), ops.zeros_like(mask))
        first = mask * (1.0 - state["seen"])
        initial = first * values + (1.0 - first) * state["initial_losses"]

        w = state["learned_weights"]
        alpha = w * mask
        count = ops.maximum(ops.sum(mask), 1.0)
        norms = ops.sqrt(ops.maximum(ops.cast(ops.diagonal(gram), "float32"), 0.0)) * mask
        mean_norm = ops.sum(norms) / count
        has_initial = initial > 0
        ratios = ops.where(has_initial, values / ops.where(has_initial, initial, 1.0), 1.0) * mask
        mean_ratio = ops.sum(ratios) / count
        relative = ops.where(mean_ratio > 0, ratios / ops.where(mean_ratio > 0, mean_ratio, 1.0), 1.0)
        weighted_norms = w * norms
        target = ops.sum(weighted_norms) / count * ops.power(relative, self.alpha)
        gradient = ops.sign(weighted_norms - target) * norms
        gradient = ops.where(mean_norm > 0, gradient / ops.where(mean_norm > 0, mean_norm, 1.0), 0.0) * mask
        stepped = ops.maximum(w - self.learning_rate * gradient, 1e-6)
        present_sum = ops.sum(w * mask)
        stepped_sum = ops.sum(stepped * mask)
        renormalised = stepped * present_sum / ops.maximum(stepped_sum, 1e-30)
        new_state = {
            "learned_weights": ops.where(present, renormalised, w),
            "initial_losses": initial,
            "seen": ops.maximum(state["seen"], mask),
        }
        return ops.cast(alpha, gram.dtype), new_state

    def get_config(self):
        base_config = super().get_config()
        config = {"alpha": self.alpha, "learning_rate": self.learning_rate}
        return {**base_config, **config}
