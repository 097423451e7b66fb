"""Random Loss Weighting (Lin et al., 2021)."""

from __future__ import annotations

import random

import keras
from keras import ops

from kmtl.weighting.base import Weighting

_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


@keras.saving.register_keras_serializable(package="kmtl")
class RLW(Weighting):
    """Random loss weighting: fresh random task weights at every step.

    At every call of `combine`, `T` numbers are drawn and normalised over
    the tasks present in the batch, and `total = sum_t w_t * L_t`:

    * `"normal"` (default, the paper's main variant): `w = softmax(x)`,
      `x_t ~ N(0, 1)`;
    * `"uniform"`: `w = softmax(x)`, `x_t ~ U(0, 1)`;
    * `"dirichlet"`: `w ~ Dirichlet(1, ..., 1)` (`x_t ~ Exp(1)`,
      `w = x / sum(x)`).

    The weights of the present tasks sum to 1 (absent tasks get 0), as in
    the paper, so the loss is on the scale of a mean, not a sum, of the
    task losses.

    Randomness is stateless and graph-safe: draw `n` uses the seed pair
    `(seed, n)` with TensorFlow's Philox generator, where the draw counter `n` is a non-trainable variable.
    The sequence of weights is therefore reproducible for a seed, identical
    on every replica, and resumes where it stopped after a checkpoint or a
    `.keras` reload. (Eager and `tf.function` runs give the same numbers;
    an XLA-compiled step (`jit_compile=True`) uses XLA's own Philox kernel
    and draws a different, equally reproducible, sequence.)

    Args:
        distribution: `"normal"`, `"uniform"` or `"dirichlet"`.
        seed: integer seed. `None` draws one at construction; the drawn
            value is part of the config, so a reloaded strategy continues
            the same sequence.
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for an unknown `distribution` or a non-integer `seed`.

    Example:

    >>> import keras
    >>> from kmtl.weighting import RLW
    >>> strategy = RLW(seed=1)
    >>> strategy.build(["digit", "parity"])
    >>> _ = strategy.combine(keras.ops.array([0.5, 2.0]), keras.ops.array([True, True]), 0)
    >>> round(float(keras.ops.sum(strategy.task_weights)), 5)
    1.0

    References:
        Lin, Ye, Xu, Shi and Zhang. Reasonable Effectiveness of Random
        Weighting: A Litmus Test for Multi-Task Learning. TMLR 2022
        (arXiv 2021). https://arxiv.org/abs/2111.10603
    """

    level = "loss"

    def __init__(self, distribution: str = "normal", seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"`distribution` must be one of {_DISTRIBUTIONS}. Received: distribution={distribution!r}"
            )
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"`seed` must be an integer in [0, 2**63) or None. Received: seed={seed!r}")
        self.distribution = distribution
        self.seed = seed

    def build_state(self, num_tasks: int) -> None:
        self.draws = self.add_state("draws", (), "zeros", dtype="int64")

    def sample(self, present):
        """Draws the next `[T]` weights (advancing the draw counter)."""
        import tensorflow as tf

        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.identity(self.draws.value)])
        self.draws.assign_add(ops.convert_to_tensor(1, dtype="int64"))
        shape = (self.num_tasks,)
        mask = ops.cast(present, "float32")
        if self.distribution == "dirichlet":
            uniform = tf.random.stateless_uniform(shape, seed=seed, minval=1e-12, maxval=1.0, alg="philox")
            x = -ops.log(uniform) * mask
            return x / ops.maximum(ops.sum(x), 1e-30)
        if self.distribution == "normal":
            x = tf.random.stateless_normal(shape, seed=seed, alg="philox")
        else:
            x = tf.random.stateless_uniform(shape, seed=seed, alg="philox")
        x = ops.where(present, x, ops.full_like(x, -1e30))
        exp = ops.exp(x - ops.max(x)) * mask
        return exp / ops.maximum(ops.sum(exp), 1e-30)

    def combine(self, losses, present, step):
        weights = self.sample(present)
        self.task_weights.assign(weights)
        return ops.sum(ops.cast(weights, losses.dtype) * losses)

    def get_config(self):
        base_config = super().get_config()
        config = {"distribution": self.distribution, "seed": self.seed}
        return {**base_config, **config}
