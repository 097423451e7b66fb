"""Small exact solvers on the Gram matrix, shared by the gradient-level strategies.

Every problem here lives on the `T x T` Gram matrix `K = G G^T` of the task
gradients (T = number of tasks, small and static), never on the gradients
themselves. The solvers compute in float64 whatever the input dtype, use only
`keras.ops` (graph- and XLA-safe: fixed shapes, `while_loop`, batched
`solve`), and take a `present` mask: an absent task is removed from the
problem and gets weight 0.

Scale. Each problem is solved on a rescaled copy whose solution maps back
exactly, and every tolerance is relative, so nothing depends on the units of
the gradients. Where the problem allows it (non-negative programs, Nash-MTL,
IMTL-G, Aligned-MTL) the rescaling is per task, `K_n = D^-1/2 K D^-1/2` with
`D = diag(K)` (unit diagonal), so a task with a gradient a million times
smaller than another is resolved as precisely as the largest one.

* `gram64`: the float64, symmetric, masked Gram matrix.
* `normalized_gram`: `gram64` divided by its mean diagonal.
* `unit_diagonal`: the per-task rescaling above.
* `nonnegative_qp`: `argmin_{l >= 0} 1/2 l^T Q l + c^T l` for several `c`
  at once: exact support enumeration for up to `max_exact_tasks` tasks,
  Lawson-Hanson active-set iterations (exact in finitely many steps) above.
* `min_norm_weights`: `argmin_{w in simplex} w^T K w` (MGDA's min-norm
  point), as a non-negative least-squares problem.
* `support_solve`: the batched equality solves behind both (a relative ridge
  of 1e-12 on a unit diagonal keeps singular systems finite; two steps of
  iterative refinement against the unridged matrix remove its bias).
* `symmetric_eigh`: cyclic Jacobi eigen-decomposition, precise in float64
  with and without XLA (whose own `eigh` is not) and relatively accurate
  on graded matrices.
* `frank_wolfe`: away-step Frank-Wolfe over the simplex, with a relative
  duality-gap stop.
* `subsets`: every 0/1 support of T coordinates, as a constant.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
from keras import ops

#: Relative ridge on unit-diagonal systems (removed again by refinement).
RIDGE = 1e-12
_TINY = 1e-300


def eps(dtype) -> float:
    """Machine epsilon of a float dtype (any form Keras accepts); float32's for other dtypes."""
    table = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
    return table.get(keras.backend.standardize_dtype(dtype), 2.0**-23)


def mask64(present):
    """The `present` mask as float64 0/1."""
    return ops.cast(present, "float64")


def gram64(gram, present):
    """The Gram matrix in float64, symmetrised, with absent rows and columns zeroed."""
    K = ops.cast(gram, "float64")
    K = 0.5 * (K + ops.transpose(K))
    mask = mask64(present)
    return K * mask[:, None] * mask[None, :]


def normalized_gram(gram, present):
    """Returns `(K, scale)`: `gram64(gram, present) / scale`.

    `scale` is the mean squared norm of the present task gradients (1 when
    they are all zero), so `K` has a unit mean diagonal.
    """
    K = gram64(gram, present)
    mask = mask64(present)
    count = ops.maximum(ops.sum(mask), 1.0)
    scale = ops.trace(K) / count
    scale = ops.where(scale > 0, scale, ops.ones_like(scale))
    return K / scale, scale


def uniform_weights(present):
    """`1 / n_present` on the present tasks, 0 elsewhere (float64)."""
    mask = mask64(present)
    return mask / ops.maximum(ops.sum(mask), 1.0)


def unit_diagonal(K, present):
    """Per-task rescaling of a float64 Gram matrix.

    Returns `(Kn, inv_sqrt, valid)`: `valid` marks the present tasks with a
    non-zero gradient (`K_tt > 0`), `inv_sqrt = 1 / sqrt(K_tt)` on them and 0
    elsewhere, and `Kn = K * inv_sqrt_i * inv_sqrt_j` (unit diagonal on the
    valid tasks, zero rows elsewhere). `|Kn_ij| <= 1` up to rounding.
    """
    diag = ops.diagonal(K)
    valid = ops.logical_and(ops.cast(present, "bool"), diag > 0)
    inv_sqrt = ops.where(valid, 1.0 / ops.sqrt(ops.maximum(diag, _TINY)), ops.zeros_like(diag))
    Kn = K * inv_sqrt[:, None] * inv_sqrt[None, :]
    return Kn, inv_sqrt, valid


def subsets(num_tasks: int, empty: bool = True) -> np.ndarray:
    """`[2^T, T]` float64 0/1 rows: every support of `num_tasks` coordinates."""
    rows = np.array(list(itertools.product((0.0, 1.0), repeat=num_tasks)), dtype=np.float64)
    return rows if empty else rows[1:]


def _eye_times(vector, num):
    """`diag(vector)` for a batch of vectors `[..., T]`."""
    return ops.eye(num, dtype="float64") * vector[..., None, :]


def support_solve(Q, rhs, support, ridge: float = RIDGE, steps: int = 2):
    """Solves `Q_SS z_S = rhs_S`, `z = 0` off `S`, for a batch of supports.

    Args:
        Q: `[T, T]` float64 matrix with a unit (or zero) diagonal.
        rhs: `[..., T, P]` right-hand sides (broadcast against `support`).
        support: `[..., T]` float64 0/1 masks.
        ridge: relative ridge added on the support (keeps exactly singular
            systems finite; `Q` has a unit diagonal, so it is scale-free).
        steps: iterative-refinement steps against the unridged system.

    Returns:
        `[..., T, P]`. Non-finite entries (singular, inconsistent systems)
        are possible; callers validate their candidates.
    """
    num = Q.shape[0]
    inside = support[..., :, None] * support[..., None, :]
    exact = Q * inside + _eye_times(1.0 - support, num)
    system = exact + ridge * _eye_times(support, num)
    b = rhs * support[..., :, None]
    z = ops.solve(system, b)
    for _ in range(steps):
        z = z + ops.solve(system, b - ops.matmul(exact, z))
    return z


def _round_robin(num: int):
    """Disjoint index pairs for every round of a cyclic Jacobi sweep (circle method)."""
    players = list(range(num + num % 2))
    rounds = []
    for _ in range(len(players) - 1):
        half = len(players) // 2
        pairs = [(players[i], players[-1 - i]) for i in range(half)]
        rounds.append([(min(p, q), max(p, q)) for p, q in pairs if max(p, q) < num])
        players = [players[0], players[-1]] + players[1:-1]
    return rounds


def symmetric_eigh(A, tol: float = 1e-15, max_sweeps: int = 40):
    """Eigen-decomposition of a small symmetric float64 matrix by cyclic Jacobi rotations.

    Returns `(eigenvalues, vectors)` with `A = V diag(eigenvalues) V^T`
    (not sorted). The backends' own `eigh` under XLA stops at a loose
    tolerance (eigenvectors good to about 1e-5 on CPU); these rotations run
    the same ops with and without XLA and stop when every off-diagonal entry
    is below `tol` times the geometric mean of its two diagonal entries,
    which also gives eigenvalues with a small relative error on matrices
    `D A D` with `A` well conditioned and `D` diagonal (graded matrices,
    Demmel and Veselic 1992), e.g. a Gram matrix whose rows have very
    different norms. Each sweep applies `T - 1` rounds of disjoint rotations;
    convergence is quadratic.
    """
    num = A.shape[0]
    A = ops.cast(A, "float64")
    eye = ops.eye(num, dtype="float64")
    if num == 1:
        return ops.diagonal(A), eye
    schedule = []
    for pairs in _round_robin(num):
        P = np.zeros((len(pairs), num))
        Q = np.zeros((len(pairs), num))
        for k, (p, q) in enumerate(pairs):
            P[k, p] = 1.0
            Q[k, q] = 1.0
        schedule.append((ops.convert_to_tensor(P), ops.convert_to_tensor(Q)))
    floor = 1e-300

    def off_diagonal(A):
        diag = ops.abs(ops.diagonal(A))
        scale = ops.sqrt(diag[:, None] * diag[None, :]) + floor + 1e-30 * ops.max(diag)
        return ops.max(ops.abs(A * (1.0 - eye)) / scale)

    def sweep(i, A, V, off):
        for P, Q in schedule:
            a_pp = ops.sum(ops.matmul(P, A) * P, axis=1)
            a_qq = ops.sum(ops.matmul(Q, A) * Q, axis=1)
            a_pq = ops.sum(ops.matmul(P, A) * Q, axis=1)
            small = ops.abs(a_pq) <= tol * ops.sqrt(ops.abs(a_pp * a_qq)) + floor
            theta = (a_qq - a_pp) / (2.0 * ops.where(small, 1.0, a_pq))
            sign = 2.0 * ops.cast(theta >= 0, "float64") - 1.0
            t = sign / (ops.abs(theta) + ops.sqrt(1.0 + theta * theta))
            t = ops.where(small, 0.0, t)
            c = 1.0 / ops.sqrt(1.0 + t * t)
            s = t * c
            J = (
                eye
                + ops.matmul(ops.transpose(P) * (c - 1.0)[None, :], P)
                + ops.matmul(ops.transpose(Q) * (c - 1.0)[None, :], Q)
                + ops.matmul(ops.transpose(P) * s[None, :], Q)
                - ops.matmul(ops.transpose(Q) * s[None, :], P)
            )
            A = ops.matmul(ops.transpose(J), ops.matmul(A, J))
            A = 0.5 * (A + ops.transpose(A))
            V = ops.matmul(V, J)
        return i + 1, A, V, off_diagonal(A)

    def cond(i, A, V, off):
        return ops.logical_and(i < max_sweeps, off > tol)

    start = (ops.convert_to_tensor(0, "int32"), A, eye, off_diagonal(A))
    _, A, V, _ = ops.while_loop(cond, sweep, start, maximum_iterations=max_sweeps)
    return ops.diagonal(A), V


def _finite(x, fill=0.0):
    return ops.where(ops.isfinite(x), x, ops.full_like(x, fill))


def nonnegative_qp(Q, C, present, max_exact_tasks: int = 10, max_iter: int = 500):
    """Solves `min_{l >= 0} 1/2 l^T Q l + c^T l` for every column `c` of `C`.

    `Q` is positive semi-definite (a Gram matrix), so this is a non-negative
    least-squares problem; it has a solution supported on linearly
    independent columns. Coordinates of absent tasks, and of tasks with
    `Q_tt = 0` (their column of `C` must then be 0), are fixed at 0.

    The problem is solved on `Q_n = S Q S`, `S = diag(Q)^-1/2` (`l = S m`
    keeps `l >= 0`), so the answer is invariant to rescaling any coordinate.
    With `T <= max_exact_tasks` every support (2^T of them) is tried at once
    in one batched solve and the candidate with the smallest KKT residual is
    kept, which is exact. Above that, Lawson-Hanson active-set iterations run
    (all columns side by side, at most `max_iter` of them), which are exact
    once they stop. A column stops early when the coordinate it would add is
    numerically dependent on its support (it would leave again at once): the
    current iterate is then optimal to working precision. At the cap the
    answer is feasible (`l >= 0`) but may be suboptimal.

    Args:
        Q: `[T, T]` PSD matrix (T static).
        C: `[T, P]` linear terms, one problem per column.
        present: `[T]` bool mask.
        max_exact_tasks: largest T solved by enumeration.
        max_iter: iteration cap of the active-set path.

    Returns:
        `[T, P]` float64 solutions.
    """
    num = Q.shape[0]
    Q = gram64(Q, present)
    mask = mask64(present)
    C = ops.cast(C, "float64") * mask[:, None]
    Qn, scale, valid = unit_diagonal(Q, present)
    valid_f = ops.cast(valid, "float64")
    # Invalid coordinates are decoupled: unit diagonal, zero linear term.
    Qn = Qn + _eye_times(1.0 - valid_f, num)
    Cn = C * scale[:, None]
    if num <= max_exact_tasks:
        m = _enumerate_nnqp(Qn, Cn)
    else:
        m = _active_set_nnqp(Qn, Cn, valid, max_iter)
    return ops.maximum(m, 0.0) * scale[:, None]


def _enumerate_nnqp(Qn, Cn):
    num = Qn.shape[0]
    supports = ops.convert_to_tensor(subsets(num))  # [S, T]
    count = supports.shape[0]
    Z = _finite(support_solve(Qn, -Cn[None], supports), np.inf)  # [S, T, P]
    grad = ops.einsum("ij,sjp->sip", Qn, Z) + Cn[None]
    inside = supports[:, :, None]
    violation = ops.maximum(
        inside * ops.maximum(-Z, ops.abs(grad)),
        (1.0 - inside) * ops.maximum(-grad, 0.0),
    )
    residual = _finite(ops.max(violation, axis=1), np.inf)  # [S, P]
    best = ops.one_hot(ops.argmin(residual, axis=0), count, dtype="float64")  # [P, S]
    return ops.einsum("ps,stp->tp", best, _finite(Z))


def _active_set_nnqp(Qn, Cn, valid, max_iter):
    """Lawson-Hanson on every column at once (unit-diagonal `Qn`)."""
    num = Qn.shape[0]
    problems = Cn.shape[1]
    # Add a coordinate only if its gradient is below -tol (relative to the column's scale).
    tol = 1e-12 * ops.max(ops.abs(Cn), axis=0)  # [P]
    candidate = ops.cast(valid, "bool")[:, None]

    def solve_on(passive):
        support = ops.transpose(ops.cast(passive, "float64"))  # [P, T]
        rhs = -ops.transpose(Cn)[:, :, None]  # [P, T, 1]
        z = support_solve(Qn, rhs, support)[:, :, 0]
        return _finite(ops.transpose(z))  # [T, P]

    def body(i, m, passive, last, done):
        z = solve_on(passive)
        feasible = ops.all(ops.logical_or(ops.logical_not(passive), z > 0), axis=0)  # [P]
        # Outer step (z feasible): accept it, add the steepest coordinate.
        grad = ops.matmul(Qn, z) + Cn
        free = ops.logical_and(candidate, ops.logical_not(passive))
        masked = ops.where(free, grad, ops.full_like(grad, np.inf))
        enter = ops.cast(ops.argmin(masked, axis=0), "int32")
        add = ops.min(masked, axis=0) < -tol
        entering = ops.logical_and(ops.transpose(ops.one_hot(enter, num)) > 0, add[None, :])
        passive_outer = ops.logical_or(passive, entering)
        # Inner step (z infeasible): move towards z until a coordinate hits 0, drop it.
        blocking = ops.logical_and(passive, z <= 0)
        ratio = ops.where(blocking, m / ops.maximum(m - z, _TINY), ops.full_like(m, np.inf))
        leave = ops.cast(ops.argmin(ratio, axis=0), "int32")
        step = ops.clip(ops.min(ratio, axis=0), 0.0, 1.0)
        m_inner = m + step[None, :] * (z - m)
        m_inner = ops.where(ops.transpose(ops.one_hot(leave, num)) > 0, 0.0, m_inner)
        passive_inner = ops.logical_and(passive, m_inner > 0)
        m_inner = ops.where(passive_inner, m_inner, 0.0)
        new_m = ops.where(feasible[None, :], ops.where(passive, z, 0.0), m_inner)
        new_passive = ops.where(feasible[None, :], passive_outer, passive_inner)
        # Numerically dependent entering column (it leaves at once, without progress): the
        # previous iterate is optimal to working precision.
        stalled = ops.logical_and(
            ops.logical_not(feasible), ops.logical_and(step <= 0, ops.equal(leave, last))
        )
        new_done = ops.logical_or(ops.logical_and(feasible, ops.logical_not(add)), stalled)
        keep = ops.logical_or(done, stalled)[None, :]
        return (
            i + 1,
            ops.where(keep, m, new_m),
            ops.where(keep, passive, new_passive),
            ops.where(ops.logical_and(feasible, add), enter, last),
            ops.logical_or(done, new_done),
        )

    def cond(i, m, passive, last, done):
        return ops.logical_and(i < max_iter, ops.logical_not(ops.all(done)))

    start = (
        ops.convert_to_tensor(0, "int32"),
        ops.zeros((num, problems), "float64"),
        ops.cast(ops.zeros((num, problems)), "bool"),
        -ops.ones((problems,), "int32"),
        ops.cast(ops.zeros((problems,)), "bool"),
    )
    _, m, _, _, _ = ops.while_loop(cond, body, start, maximum_iterations=max_iter)
    return m


def min_norm_weights(gram, present, max_exact_tasks: int = 10, max_iter: int = 500):
    """Weights of the min-norm point of the convex hull of the task gradients.

    Solves `min_{w in simplex} w^T K w` over the present tasks exactly, as
    the non-negative least-squares problem
    `min_{l >= 0} |G^T l|^2 + s (1^T l - 1)^2`: its solution is
    `l = w / (1 + |G^T w|^2 / s)` for any `s > 0`, so `w = l / sum(l)`.
    `s` is the smallest non-zero squared gradient norm, which keeps the
    extra constant row on the scale of the smallest task (so it does not
    blur the geometry of small gradients). A present task with a zero
    gradient makes the min-norm point 0 and takes all the weight (with
    several, one split of it); if every present gradient is zero the weights
    are uniform.

    Args:
        gram: `[T, T]` Gram matrix (any float dtype; T static).
        present: `[T]` bool mask.
        max_exact_tasks, max_iter: as in `nonnegative_qp`.

    Returns:
        `[T]` float64 weights (0 for absent tasks, summing to 1 when any task
        is present).
    """
    K = gram64(gram, present)
    mask = mask64(present)
    diag = ops.diagonal(K)
    positive = ops.logical_and(ops.cast(present, "bool"), diag > 0)
    s = ops.min(ops.where(positive, diag, ops.full_like(diag, np.inf)))
    s = ops.where(ops.any(positive), s, 1.0)
    Q = K + s * mask[:, None] * mask[None, :]
    lam = nonnegative_qp(Q, -s * mask[:, None], present, max_exact_tasks, max_iter)[:, 0]
    w = lam / ops.maximum(ops.sum(lam), _TINY)
    return ops.where(ops.any(positive), w, uniform_weights(present))


def frank_wolfe(gradient_fn, step_fn, present, max_iter, tol, init=None):
    """Minimises a convex function over the simplex of the present tasks.

    Frank-Wolfe with away steps (linear convergence on polytopes for
    strongly convex objectives, unlike the plain method).

    Args:
        gradient_fn: `w -> [T]` gradient of the objective (float64).
        step_fn: `(w, d, gamma_max) -> gamma`, the exact line search of the
            objective along `d` over `[0, gamma_max]`.
        present: `[T]` bool; absent tasks keep weight 0.
        max_iter: maximum number of iterations (a Python int).
        tol: stop when the Frank-Wolfe duality gap is below `tol` times the
            largest absolute gradient entry (a relative stop).
        init: optional starting point on the simplex (default: uniform).

    Returns:
        `[T]` float64 weights on the simplex.
    """
    present = ops.cast(present, "bool")
    mask = mask64(present)
    w0 = uniform_weights(present) if init is None else ops.cast(init, "float64")
    num = w0.shape[0]

    def body(i, w, gap):
        grad = gradient_fn(w)
        s = ops.argmin(ops.where(present, grad, np.inf))
        active = ops.logical_and(present, w > 0)
        v = ops.argmax(ops.where(active, grad, -np.inf))
        wg = ops.sum(w * grad)
        e_s = ops.one_hot(s, num, dtype="float64")
        e_v = ops.one_hot(v, num, dtype="float64")
        gap_fw = wg - ops.sum(grad * e_s)
        gap_away = ops.sum(grad * e_v) - wg
        use_fw = gap_fw >= gap_away
        d = ops.where(use_fw, e_s - w, w - e_v)
        w_v = ops.sum(w * e_v)
        gamma_max = ops.where(use_fw, 1.0, w_v / ops.maximum(1.0 - w_v, _TINY))
        gamma = step_fn(w, d, gamma_max)
        w_new = ops.maximum(w + gamma * d, 0.0) * mask
        w_new = w_new / ops.maximum(ops.sum(w_new), _TINY)
        scale = ops.max(ops.where(present, ops.abs(grad), 0.0))
        return i + 1, w_new, gap_fw / ops.maximum(scale, _TINY)

    def cond(i, w, gap):
        return ops.logical_and(i < max_iter, gap > tol)

    start = (ops.convert_to_tensor(0, "int32"), w0, ops.convert_to_tensor(np.inf, "float64"))
    _, w, _ = ops.while_loop(cond, body, start, maximum_iterations=max_iter)
    return w


__all__ = [
    "eps",
    "frank_wolfe",
    "gram64",
    "min_norm_weights",
    "nonnegative_qp",
    "normalized_gram",
    "subsets",
    "support_solve",
    "symmetric_eigh",
    "uniform_weights",
    "unit_diagonal",
]
