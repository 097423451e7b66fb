"""Gradient Vaccine (Wang et al., 2021): steer pairwise gradient similarity towards its EMA."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks, _random
from kmtl.weighting.base import Weighting

_TINY = 1e-150


def _scaled_gram(gram, mask):
    """float64 Gram matrix of the present tasks (absent rows and columns zeroed), unit mean diagonal.

    Cosines and the coefficients below do not depend on that scaling; it
    keeps float64 far from overflow for huge gradients.
    """
    gram = ops.cast(gram, "float64")
    gram = 0.5 * (gram + ops.transpose(gram))
    gram = gram * mask[:, None] * mask[None, :]
    scale = ops.sum(ops.diagonal(gram)) / ops.maximum(ops.sum(mask), 1.0)
    return gram / ops.where(scale > 0, scale, ops.ones_like(scale))


@register("weighting", "gradvac")
class GradVac(Weighting):
    """Gradient Vaccine: adaptive pairwise cosine-similarity targets.

    The strategy keeps, for every ordered task pair `(i, j)`, a target
    cosine similarity `phi_hat_ij`, an exponential moving average
    (`phi_hat <- (1 - beta) phi_hat + beta phi`, started at 0) of the
    observed similarities. Every task gradient `g_i` visits the other tasks
    `j` in a random order; with `phi = cos(g_i^GV, g_j)`, if
    `phi < phi_hat_ij` it is moved towards `g_j` just enough to reach the
    target:

        g_i^GV <- g_i^GV + |g_i^GV| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                           / (|g_j| sqrt(1 - phi_hat^2)) * g_j

    and the target is updated with `phi`. The update is `sum_i g_i^GV`.

    Like PCGrad, every `g_i^GV` is a linear combination of the task
    gradients, so kmtl runs the procedure on its coefficients with the
    Gram matrix only (in float64), over all shared parameters together (the
    paper also describes per-layer groups; LibMTL's default,
    `GradVac_group_type=0`, is the whole model, as here). Random orders
    come from the stateless generator of `kmtl.weighting._random`, keyed by
    `(seed, draw counter)`, as in `PCGrad`: reproducible for a seed, the
    same on every replica and with or without XLA. Pairs with an absent
    task or a zero gradient are skipped and their targets are not updated.

    Args:
        beta: EMA rate of the targets, in (0, 1] (0.01 in the paper).
        seed: integer seed of the random orders; `None` draws one at
            construction from Python's `random` (so
            `keras.utils.set_random_seed` fixes it; kept in the config).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Raises:
        ValueError: for a `beta` outside (0, 1] or a `seed` that is not a
            non-negative integer.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import GradVac
    >>> strategy = GradVac(beta=0.5, seed=0)
    >>> strategy.build(["a", "b"])
    >>> G = np.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> alpha, new_state = strategy.weights_from_gram(G @ G.T, np.ones(2), np.array([True, True]),
    ...                                               0, strategy.state())
    >>> np.round(new_state["targets"].numpy(), 4)  # (1 - 0.5) * 0 + 0.5 * cos
    array([[ 0.    , -0.3536],
           [-0.3536,  0.    ]], dtype=float32)

    References:
        Wang, Tsvetkov, Firat and Cao. Gradient Vaccine: Investigating and
        Improving Multi-task Optimization in Massively Multilingual Models.
        ICLR 2021. https://arxiv.org/abs/2010.05874
    """

    level = "gradient"
    gram_based = True

    def __init__(self, beta: float = 0.01, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.beta = _checks.number(beta, "beta", low=0.0, high=1.0, low_open=True)
        self.seed = _checks.seed(seed)

    def build_state(self, num_tasks: int) -> None:
        self.targets = self.add_state("targets", (num_tasks, num_tasks), "zeros")
        self.draws = self.add_state("draws", (), "zeros", dtype="int64")

    def weights_from_gram(self, gram, values, present, step, state):
        gram = ops.convert_to_tensor(gram)
        num_tasks = gram.shape[0]
        present = ops.cast(present, "bool")
        mask = ops.cast(present, "float64")
        K = _scaled_gram(gram, mask)
        orders = _random.orders(_random.key(self.seed, state["draws"]), num_tasks)
        targets = ops.cast(state["targets"], "float64")
        coefficients = ops.eye(num_tasks, dtype="float64")
        norms = ops.sqrt(ops.maximum(ops.diagonal(K), 0.0))
        tasks = ops.arange(num_tasks, dtype="int32")
        for k in range(num_tasks):
            partner = orders[:, k]  # task i is steered towards task partner[i]
            onehot = ops.one_hot(partner, num_tasks, dtype="float64")
            ck = ops.matmul(coefficients, K)
            dots = ops.sum(ck * onehot, axis=1)
            own_norm = ops.sqrt(ops.maximum(ops.sum(ck * coefficients, axis=1), 0.0))
            partner_norm = ops.take(norms, partner)
            valid = ops.logical_and(
                ops.logical_and(
                    ops.not_equal(partner, tasks), ops.logical_and(present, ops.take(present, partner))
                ),
                ops.logical_and(own_norm > _TINY, partner_norm > _TINY),
            )
            cosine = ops.clip(dots / ops.maximum(own_norm * partner_norm, 1e-300), -1.0, 1.0)
            target = ops.sum(targets * onehot, axis=1)
            sin_target = ops.sqrt(ops.maximum(1.0 - target * target, 1e-12))
            sin_cosine = ops.sqrt(ops.maximum(1.0 - cosine * cosine, 0.0))
            step_size = own_norm * (target * sin_cosine - cosine * sin_target)
            step_size = step_size / (ops.maximum(partner_norm, 1e-300) * sin_target)
            move = ops.logical_and(valid, cosine < target)
            coefficients = coefficients + ops.where(move, step_size, 0.0)[:, None] * onehot
            update = ops.where(valid, self.beta * (cosine - target), 0.0)
            targets = targets + update[:, None] * onehot
        alpha = ops.tensordot(mask, coefficients, axes=1) * mask
        new_state = {"targets": ops.cast(targets, "float32"), "draws": state["draws"] + 1}
        return ops.cast(alpha, gram.dtype), new_state

    def get_config(self):
        base_config = super().get_config()
        config = {"beta": self.beta, "seed": self.seed}
        return {**base_config, **config}
