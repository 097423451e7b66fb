"""MGDA (Sener & Koltun, 2018): the min-norm point of the task gradients' convex hull."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks, _solvers
from kmtl.weighting.base import Weighting

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register("weighting", "mgda")
class MGDA(Weighting):
    """Multiple-gradient descent: the min-norm convex combination of the task gradients.

    The weights solve

        alpha = argmin_{alpha in simplex} |sum_t alpha_t g_t|^2
              = argmin_{alpha in simplex} alpha^T K alpha,   K = G G^T,

    and the update is `d = sum_t alpha_t g_t`, a direction that does not
    increase any task loss to first order: `g_t . d >= |d|^2` for every
    task, with equality where `alpha_t > 0` (the KKT conditions), and `d = 0`
    at a Pareto-stationary point. For two tasks the solution is
    `alpha_1 = clip((g_2 - g_1) . g_2 / |g_1 - g_2|^2, 0, 1)`.

    kmtl solves the problem exactly in the graph, as the non-negative
    least-squares problem `min_{l >= 0} |G^T l|^2 + s (1^T l - 1)^2`
    (`alpha = l / sum(l)`; see `kmtl.weighting._solvers.min_norm_weights`):
    by enumerating the supports for up to `max_exact_tasks` tasks and by
    Lawson-Hanson active-set iterations (at most `max_iter`) above. Every
    system is solved with unit-norm columns and every tolerance is relative,
    so `alpha(c G) = alpha(G)` and tasks with very different gradient norms
    are handled alike.

    Degenerate cases: when the convex hull contains 0 (e.g. more tasks than
    the gradients' rank with no common descent direction, two opposite
    gradients, or a zero gradient), the update is 0 and `alpha` is one of
    the (then non-unique) convex combinations that give it (a zero gradient
    takes all the weight). Absent tasks take no part and get weight 0.

    `normalization` rescales the gradients before solving, as in the paper's
    code: `"none"` (default), `"l2"` (`g_t / |g_t|`), `"loss"`
    (`g_t / L_t`) or `"loss+"` (`g_t / (L_t |g_t|)`). As in that code, the
    weights found on the normalized gradients are applied to the original
    gradients. A task whose normalizer is 0 is treated as a zero gradient.

    MGDA-UB (the paper's cheap upper bound: the same problem on the
    gradients of the shared representation, then one backward pass) is
    `MGDA(mode="representation")`.

    Args:
        normalization: `"none"`, `"l2"`, `"loss"` or `"loss+"`.
        max_exact_tasks: number of tasks up to which the problem is solved by
            enumerating its supports (2^T small systems in one batched
            solve).
        max_iter: active-set iteration cap (more than `max_exact_tasks`
            tasks); the iterations stop as soon as the solution is exact.
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Raises:
        ValueError: for an unknown `normalization`, a `max_exact_tasks`
            outside [0, 14] or a `max_iter` < 1.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import MGDA
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> MGDA().aggregate(G).numpy()  # alpha = [0.8, 0.2]
    array([0.8, 0.4])

    References:
        Sener and Koltun. Multi-Task Learning as Multi-Objective
        Optimization. NeurIPS 2018. https://arxiv.org/abs/1810.04650
        Desideri. Multiple-gradient descent algorithm (MGDA) for
        multiobjective optimization. Comptes Rendus Mathematique, 2012.
    """

    level = "gradient"
    gram_based = True

    def __init__(self, normalization: str = "none", max_exact_tasks: int = 10, max_iter: int = 500, **kwargs):
        super().__init__(**kwargs)
        self.normalization = _checks.choice(normalization, "normalization", _NORMALIZATIONS)
        self.max_exact_tasks = _checks.integer(max_exact_tasks, "max_exact_tasks", low=0, high=14)
        self.max_iter = _checks.positive_int(max_iter, "max_iter")

    def weights_from_gram(self, gram, values, present, step, state):
        K = _solvers.gram64(gram, present)
        if self.normalization != "none":
            norms = ops.sqrt(ops.maximum(ops.diagonal(K), 0.0))
            loss_values = ops.abs(ops.cast(values, "float64"))
            if self.normalization == "l2":
                scale = norms
            elif self.normalization == "loss":
                scale = loss_values
            else:
                scale = loss_values * norms
            positive = scale > 0
            inverse = ops.where(positive, 1.0 / ops.where(positive, scale, 1.0), 0.0)
            K = K * inverse[:, None] * inverse[None, :]
        alpha = _solvers.min_norm_weights(K, present, self.max_exact_tasks, self.max_iter)
        return ops.cast(alpha, gram.dtype), {}

    def get_config(self):
        base_config = super().get_config()
        config = {
            "normalization": self.normalization,
            "max_exact_tasks": self.max_exact_tasks,
            "max_iter": self.max_iter,
        }
        return {**base_config, **config}
