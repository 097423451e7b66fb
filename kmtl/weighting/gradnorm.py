"""GradNorm (Chen et al., 2018): learn task weights that balance gradient norms."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
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

    `L_t(0)` is the first loss seen for task `t` (recorded the first time
    the task is present). Absent tasks have weight 0 in the update and
    their `w_t` and `L_t(0)` are left unchanged.

    Args:
        alpha: asymmetry `alpha >= 0` (1.5 in the paper; 0 equalises the
            gradient norms).
        learning_rate: step size of the weight update (> 0).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for a negative `alpha` or a non-positive `learning_rate`.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import GradNorm
    >>> strategy = GradNorm(learning_rate=0.1)
    >>> d = strategy.aggregate(np.array([[1.0, 0.0], [0.0, 4.0]]))
    >>> np.round(strategy.learned_weights.numpy(), 4)  # task 1 has the smaller norm: it gains weight
    array([1.1064, 0.8936], dtype=float32)

    References:
        Chen, Badrinarayanan, Lee and Rabinovich. GradNorm: Gradient
        Normalization for Adaptive Loss Balancing in Deep Multitask
        Networks. ICML 2018. https://arxiv.org/abs/1711.02257
    """

    level = "gradient"
    gram_based = True

    def __init__(self, alpha: float = 1.5, learning_rate: float = 0.025, **kwargs):
        super().__init__(**kwargs)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 <= float(alpha) < float("inf")
        ):
            raise ValueError(f"`alpha` must be a finite number >= 0. Received: alpha={alpha!r}")
        if (
            isinstance(learning_rate, bool)
            or not isinstance(learning_rate, (int, float))
            or not 0 < float(learning_rate) < float("inf")
        ):
            raise ValueError(
                f"`learning_rate` must be a finite number > 0. Received: learning_rate={learning_rate!r}"
            )
        self.alpha = float(alpha)
        self.learning_rate = float(learning_rate)

    def build_state(self, num_tasks: int) -> None:
        self.learned_weights = self.add_state("learned_weights", (num_tasks,), "ones")
        self.initial_losses = self.add_state("initial_losses", (num_tasks,), "zeros")
        self.seen = self.add_state("seen", (num_tasks,), "zeros")

    def weights_from_gram(self, gram, losses, present, step):
        mask = tf.cast(present, tf.float32)
        losses = tf.cast(losses, tf.float32)
        first = mask * (1.0 - self.seen)
        initial = first * losses + (1.0 - first) * self.initial_losses
        self.initial_losses.assign(initial)
        self.seen.assign(tf.maximum(self.seen, mask))

        w = tf.convert_to_tensor(self.learned_weights)
        alpha = w * mask
        count = tf.maximum(tf.reduce_sum(mask), 1.0)
        norms = tf.sqrt(tf.maximum(tf.cast(tf.linalg.diag_part(gram), tf.float32), 0.0)) * mask
        mean_norm = tf.reduce_sum(norms) / count
        ratios = tf.where(initial > 0, losses / tf.where(initial > 0, initial, 1.0), 1.0) * mask
        mean_ratio = tf.reduce_sum(ratios) / count
        relative = tf.where(mean_ratio > 0, ratios / tf.where(mean_ratio > 0, mean_ratio, 1.0), 1.0)
        weighted_norms = w * norms
        target = tf.reduce_sum(weighted_norms) / count * tf.pow(relative, self.alpha)
        gradient = tf.sign(weighted_norms - target) * norms
        gradient = tf.where(mean_norm > 0, gradient / tf.where(mean_norm > 0, mean_norm, 1.0), 0.0) * mask
        stepped = tf.maximum(w - self.learning_rate * gradient, 1e-6)
        present_sum = tf.reduce_sum(w * mask)
        stepped_sum = tf.reduce_sum(stepped * mask)
        renormalised = stepped * present_sum / tf.maximum(stepped_sum, 1e-30)
        self.learned_weights.assign(tf.where(present, renormalised, w))
        return tf.cast(alpha, gram.dtype)

    def get_config(self):
        base_config = super().get_config()
        config = {"alpha": self.alpha, "learning_rate": self.learning_rate}
        return {**base_config, **config}
