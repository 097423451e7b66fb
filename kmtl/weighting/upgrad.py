"""UPGrad (Quinton & Rey, 2024): average of the task gradients projected onto the dual cone."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks, _solvers
from kmtl.weighting.base import Weighting


@register("weighting", "upgrad")
class UPGrad(Weighting):
    """Unconflicting projection of gradients.

    Each task gradient `g_i` is projected onto the dual cone of the task
    gradients, `{x : g_t . x >= 0 for every t}` (the directions that
    conflict with no task), and the projections are averaged. By duality
    the projection of `g_i` is `G^T (e_i + lambda_i)` where

        lambda_i = argmin_{lambda >= 0} 1/2 lambda^T K lambda + lambda^T K e_i,

    a small non-negative quadratic program on the Gram matrix `K`, solved in
    the graph by `kmtl.weighting._solvers.nonnegative_qp`: exactly, by
    enumerating the supports, for up to `max_exact_tasks` tasks, and by
    Lawson-Hanson active-set iterations above. The weights are
    `alpha = mean_i (e_i + lambda_i)` over the present tasks, and the update
    `d = G^T alpha` has a non-negative inner product with every task
    gradient. When no task conflicts, every `lambda_i` is 0 and UPGrad is the
    mean gradient.

    The programs are solved with every task gradient rescaled to unit norm
    (`lambda_i` maps back exactly), so the dual cone, which only depends on
    the gradients' directions, is resolved equally well for every task
    whatever the spread of the gradient norms, and no tolerance depends on
    their units: `alpha(c G) = alpha(G)`.

    Degenerate cases: when the task gradients positively span their span
    (e.g. more tasks than the gradients' rank and no common descent
    direction, or two exactly opposite gradients), the dual cone meets that
    span only at 0 and the update is 0; `lambda_i` is then not unique, the
    update is. A zero gradient adds no constraint (it still counts in the
    mean, with weight `1 / n_present`). Absent tasks take no part and get
    weight 0.

    Args:
        max_exact_tasks: number of tasks up to which the quadratic programs
            are solved by exact enumeration of their support (2^T small
            systems in one batched solve); above it the active-set method
            is used.
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Raises:
        ValueError: for a `max_exact_tasks` outside [0, 14].

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import UPGrad
    >>> G = np.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> UPGrad().aggregate(G).numpy()
    array([0.25, 0.75])

    References:
        Quinton and Rey. Jacobian Descent for Multi-Objective Optimization.
        arXiv 2024. https://arxiv.org/abs/2406.16232
    """

    level = "gradient"
    gram_based = True

    def __init__(self, max_exact_tasks: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.max_exact_tasks = _checks.integer(max_exact_tasks, "max_exact_tasks", low=0, high=14)

    def weights_from_gram(self, gram, values, present, step, state):
        K = _solvers.gram64(gram, present)
        mask = _solvers.mask64(present)
        lambdas = _solvers.nonnegative_qp(K, K * mask[None, :], present, max_exact_tasks=self.max_exact_tasks)
        count = ops.maximum(ops.sum(mask), 1.0)
        alpha = (mask + ops.matmul(lambdas, mask)) * mask / count
        return ops.cast(alpha, gram.dtype), {}

    def get_config(self):
        base_config = super().get_config()
        config = {"max_exact_tasks": self.max_exact_tasks}
        return {**base_config, **config}
