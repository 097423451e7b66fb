"""Nash-MTL (Navon et al., 2022): the Nash bargaining solution, solved in the graph."""

from __future__ import annotations

from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks, _solvers
from kmtl.weighting.base import Weighting


@register("weighting", "nash_mtl")
class NashMTL(Weighting):
    """Multi-task learning as a bargaining game (Nash-MTL).

    The update `d = G^T alpha` is the Nash bargaining solution among the
    tasks: the weights `alpha > 0` solve

        (K alpha)_t = 1 / alpha_t   for every task t    (K = G G^T),

    i.e. every task's directional derivative `g_t . d` is `1 / alpha_t`;
    consequently `|d|^2 = alpha^T K alpha = T`. These are the optimality
    conditions of the strictly convex problem
    `min_{alpha > 0} 1/2 alpha^T K alpha - sum_t log alpha_t`.

    kmtl solves them per task rescaled: with `D = diag(K)` and
    `alpha_t = beta_t / sqrt(D_t)` the equations become
    `(K_n beta)_t = 1 / beta_t` on the unit-diagonal matrix
    `K_n = D^-1/2 K D^-1/2`, which only depends on the gradients'
    directions. So each task is resolved alike whatever the spread of the
    gradient norms, and `alpha(c G) = alpha(G) / c`. The solve is damped
    Newton in the graph (no cvxpy): with Newton decrement `lambda`, the step
    `Delta / (1 + lambda)` of this self-concordant function never leaves
    `beta > 0`, and once `lambda < 1/4` full Newton steps converge
    quadratically; it stops when `lambda < 1e-10` (scale-free) or after
    `max_iter` steps.

    `ridge` (relative: it is added to the unit diagonal of `K_n`) makes the
    problem solvable in every case. Without it no solution exists when a
    non-negative combination of the task gradients is 0 (Pareto
    stationarity: e.g. `g_2 = -g_1`, or more tasks than the gradients' rank
    with no common descent direction): the weights of the tasks in that
    combination then grow like `1 / sqrt(ridge)`, their contributions cancel
    in the update, and the update is the bargaining solution among the
    remaining directions (0 for two opposite gradients). Where a solution
    exists, the ridge changes the equations only by the relative term
    `ridge * beta_t^2`.

    The paper's "update the weights every k steps" is the base argument
    `update_every`. Unlike the paper's code, kmtl neither caps `alpha`'s
    rescaling of the gradient nor clips the update norm; use the optimizer's
    `clipnorm` for that. Absent tasks and tasks with an exactly zero gradient
    (no direction to bargain over) take no part and get weight 0; if all
    present gradients are zero the weights are 0.

    Args:
        max_iter: Newton iteration cap (convergence usually takes < 15 steps;
            the Pareto-stationary cases above take more).
        ridge: relative Tikhonov term added to the unit-diagonal Gram matrix
            (in (0, 1)).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`,
            `engine`, `name`).

    Raises:
        ValueError: for a `max_iter` < 1 or a `ridge` outside (0, 1).

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import NashMTL
    >>> G = np.array([[2.0, 0.0], [0.0, 0.5]])  # orthogonal: alpha_t = 1 / |g_t|
    >>> np.round(NashMTL().aggregate(G).numpy(), 6)
    array([1., 1.])

    References:
        Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya.
        Multi-Task Learning as a Bargaining Game. ICML 2022.
        https://arxiv.org/abs/2202.01017
    """

    level = "gradient"
    gram_based = True

    def __init__(self, max_iter: int = 100, ridge: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        self.max_iter = _checks.positive_int(max_iter, "max_iter")
        self.ridge = _checks.number(ridge, "ridge", low=0.0, high=1.0, low_open=True, high_open=True)

    def weights_from_gram(self, gram, values, present, step, state):
        num_tasks = gram.shape[0]
        K = _solvers.gram64(gram, present)
        Kn, inv_sqrt, valid = _solvers.unit_diagonal(K, present)
        valid_f = ops.cast(valid, "float64")
        # Invalid tasks are decoupled (unit diagonal, beta_t = 1), then zeroed.
        eye = ops.eye(num_tasks, dtype="float64")
        Kn = Kn + eye * (1.0 - valid_f)[None, :] + self.ridge * eye * valid_f[None, :]
        beta0 = ops.ones((num_tasks,), "float64") / ops.sqrt(1.0 + self.ridge * valid_f)

        def body(i, beta, decrement):
            grad = ops.matmul(Kn, beta) - 1.0 / beta
            hessian = Kn + eye / (beta * beta)[None, :]
            delta = -ops.solve(hessian, grad)
            decrement = ops.sqrt(ops.maximum(-ops.sum(grad * delta), 0.0))
            damping = ops.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement))
            beta = ops.maximum(beta + damping * delta, 1e-300)
            return i + 1, beta, decrement

        def cond(i, beta, decrement):
            return ops.logical_and(i < self.max_iter, decrement > 1e-10)

        start = (ops.convert_to_tensor(0, "int32"), beta0, ops.convert_to_tensor(1.0, "float64"))
        _, beta, _ = ops.while_loop(cond, body, start, maximum_iterations=self.max_iter)
        alpha = beta * inv_sqrt * valid_f
        return ops.cast(alpha, gram.dtype), {}

    def get_config(self):
        base_config = super().get_config()
        config = {"max_iter": self.max_iter, "ridge": self.ridge}
        return {**base_config, **config}
