"""PCGrad (Yu et al., 2020): project conflicting gradients, computed on the Gram matrix."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks, _random, _solvers
from kmtl.weighting.base import Weighting


@register("weighting", "pcgrad")
class PCGrad(Weighting):
    """Projecting Conflicting Gradients ("gradient surgery").

    Every task gradient `g_i` is visited against the other tasks `j` in a
    random order; whenever the current `g_i^PC` conflicts with the original
    `g_j` (`g_i^PC . g_j < 0`) its component along `g_j` is removed:

        g_i^PC <- g_i^PC - (g_i^PC . g_j) / |g_j|^2 * g_j

    and the update is the sum `sum_i g_i^PC`. Non-conflicting gradients are
    left alone, so without conflicts PCGrad is the plain sum.

    Every `g_i^PC` stays a linear combination `sum_k C_ik g_k` of the task
    gradients, so kmtl runs the surgery on the coefficients `C` using only
    the `T x T` Gram matrix (`g_a . g_b` is `K_ab`, `(C K)_ij` is
    `g_i^PC . g_j`) and returns `alpha = sum_i C_i` (`update = G^T alpha`);
    the gradients themselves are touched once, in the final combination.
    The projections of all tasks run side by side, so one pass costs `T`
    small steps. Only signs and ratios of inner products enter, so
    `alpha(c G) = alpha(G)`.

    The random orders (one permutation per task per step) are a pure
    function of `(seed, draws)` (`kmtl.weighting._random`), where `draws`
    is a state variable the step advances when it commits: reproducible for
    a seed, identical on every replica and with or without XLA, and
    continued after a reload. With two tasks the order does not matter.

    Degenerate cases: absent tasks take no part and get weight 0; a zero
    gradient never triggers a projection. Exactly opposite gradients project
    each other to 0 (the update is 0 for a pair `g, -g`).

    Args:
        seed: integer seed of the random orders. `None` draws one at
            construction from Python's `random` (so
            `keras.utils.set_random_seed` fixes it; kept in the config).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Raises:
        ValueError: for a `seed` that is not an integer in [0, 2**63).

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import PCGrad
    >>> G = np.array([[1.0, 0.0], [-1.0, 1.0]])  # conflicting: g1 . g2 = -1
    >>> PCGrad(seed=0).aggregate(G).numpy()
    array([0.5, 1.5])

    References:
        Yu, Kumar, Gupta, Levine, Hausman and Finn. Gradient Surgery for
        Multi-Task Learning. NeurIPS 2020. https://arxiv.org/abs/2001.06782
    """

    level = "gradient"
    gram_based = True

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = _checks.seed(seed)

    def build_state(self, num_tasks: int) -> None:
        self.draws = self.add_state("draws", (), "zeros", dtype="int64")

    def weights_from_gram(self, gram, values, present, step, state):
        num_tasks = gram.shape[0]
        K, _ = _solvers.normalized_gram(gram, present)
        mask = _solvers.mask64(present)
        orders = _random.orders(_random.key(self.seed, state["draws"]), num_tasks)
        coefficients = ops.eye(num_tasks, dtype="float64")
        squared_norms = ops.diagonal(K)
        tasks = ops.arange(num_tasks, dtype="int32")
        for k in range(num_tasks):
            partner = orders[:, k]  # task i is projected against task partner[i]
            onehot = ops.one_hot(partner, num_tasks, dtype="float64")
            dots = ops.sum(ops.matmul(coefficients, K) * onehot, axis=1)
            partner_norm = ops.sum(onehot * squared_norms[None, :], axis=1)
            conflict = ops.logical_and(dots < 0, ops.logical_and(partner != tasks, partner_norm > 0))
            ratio = dots / ops.where(partner_norm > 0, partner_norm, 1.0)
            coefficients = coefficients - ops.where(conflict, ratio, 0.0)[:, None] * onehot
        alpha = ops.matmul(mask, coefficients) * mask
        return ops.cast(alpha, gram.dtype), {"draws": state["draws"] + 1}

    def get_config(self):
        base_config = super().get_config()
        config = {"seed": self.seed}
        return {**base_config, **config}
