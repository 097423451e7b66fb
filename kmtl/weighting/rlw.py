"""Random Loss Weighting (Lin et al., 2021)."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks, _random
from kmtl.weighting.base import Weighting

DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


@register("weighting", "rlw")
class RLW(Weighting):
    """Random loss weighting: fresh random task weights at every step.

    At every step `T` numbers are drawn and normalised over the tasks
    present in the batch, and `total = sum_t w_t * L_t`:

    * `"normal"` (default, the paper's main variant): `w = softmax(x)`,
      `x_t ~ N(0, 1)`;
    * `"uniform"`: `w = softmax(x)`, `x_t ~ U(0, 1)`;
    * `"dirichlet"`: `w ~ Dirichlet(1, ..., 1)` (`x_t ~ Exp(1)`,
      `w = x / sum(x)`).

    The weights of the present tasks sum to 1 (absent tasks get 0), as in
    the paper, so the loss is on the scale of a mean, not a sum, of the
    task losses.

    Randomness is stateless (`kmtl.weighting._random`): draw `n` is a pure
    function of `(seed, n)`, where the draw counter `n` is a state variable
    that advances by one with every committed step (a rejected batch does
    not consume a draw). The sequence of weights is therefore reproducible
    for a seed, identical on every replica and with or without XLA, and
    resumes where it stopped after a checkpoint or a `.keras` reload.

    Args:
        distribution: `"normal"`, `"uniform"` or `"dirichlet"`.
        seed: integer seed in [0, 2**63). `None` draws one at construction
            from Python's `random` (so `keras.utils.set_random_seed` fixes
            it); the drawn value is part of the config, so a reloaded
            strategy continues the same sequence.
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for an unknown `distribution` or a `seed` that is not a
            non-negative integer.

    Example:

    >>> import keras
    >>> from kmtl.weighting import RLW
    >>> strategy = RLW(seed=1)
    >>> strategy.build(["digit", "parity"])
    >>> losses, present = keras.ops.array([0.5, 2.0]), keras.ops.array([True, True])
    >>> _, weights, new_state = strategy.combine(losses, losses, present, 0, strategy.state())
    >>> round(float(keras.ops.sum(weights)), 5), int(new_state["draws"])
    (1.0, 1)

    References:
        Lin, Ye, Xu, Shi and Zhang. Reasonable Effectiveness of Random
        Weighting: A Litmus Test for Multi-Task Learning. TMLR 2022
        (arXiv 2021). https://arxiv.org/abs/2111.10603
    """

    level = "loss"

    def __init__(self, distribution: str = "normal", seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.distribution = _checks.choice(distribution, "distribution", DISTRIBUTIONS)
        self.seed = _checks.seed(seed)

    def build_state(self, num_tasks: int) -> None:
        self.draws = self.add_state("draws", (), "zeros", dtype="int64")

    def sample(self, present, state):
        """The `[T]` weights of draw number `state["draws"]` (pure)."""
        present = ops.cast(present, "bool")
        key = _random.key(self.seed, state["draws"])
        shape = (self.num_tasks,)
        mask = ops.cast(present, "float32")
        if self.distribution == "dirichlet":
            x = -ops.log(1.0 - _random.uniform(key, shape)) * mask  # Exp(1): 1 - u is in (0, 1]
            return x / ops.maximum(ops.sum(x), 1e-30)
        if self.distribution == "normal":
            x = _random.normal(key, shape)
        else:
            x = _random.uniform(key, shape)
        x = ops.where(present, x, ops.full_like(x, -1e30))
        exp = ops.exp(x - ops.max(x)) * mask
        return exp / ops.maximum(ops.sum(exp), 1e-30)

    def combine(self, losses, values, present, step, state):
        present = ops.cast(present, "bool")
        weights = self.sample(present, state)
        safe = ops.where(present, losses, ops.zeros_like(losses))
        total = ops.sum(ops.cast(weights, losses.dtype) * safe)
        return total, weights, {"draws": state["draws"] + 1}

    def get_config(self):
        base_config = super().get_config()
        config = {"distribution": self.distribution, "seed": self.seed}
        return {**base_config, **config}
