"""Regression tasks of controllable relatedness (Ma et al. 2018, MMoE, section 3).

The construction, for `T` tasks on inputs of dimension `d`:

1. Draw `T` orthonormal directions `u_1..u_T` in `R^d` (from `task_seed`).
2. Factor the task-cosine matrix `C` (ones on the diagonal; `C[s, t] = correlation`
   for every pair, or a given matrix) as `C = L L^T` with `L` lower triangular,
   and set `w_t = scale * sum_j L[t, j] u_j`, so that `cos(w_s, w_t) = C[s, t]`. For
   two tasks this is Ma et al.'s `w_1 = c u_1`, `w_2 = c (p u_1 + sqrt(1 - p^2) u_2)`.
3. Draw `m` sinusoid parameters `alpha_i, beta_i ~ N(0, 1)` (from `task_seed`),
   shared by all tasks.
4. For each example `x ~ N(0, I_d)` (from `seed`), the label of task `t` is

       y_t = w_t^T x + sum_{i=1}^{m} sin(alpha_i w_t^T x + beta_i) + eps_t,
       eps_t ~ N(0, noise^2)

   (the paper's `N(0, 0.01)` is the default `noise=0.1`).

The task is fixed by `task_seed` (directions and sinusoids); `seed` draws the
examples and the noise. A training and a test set of the same tasks therefore share
`task_seed` and differ in `seed`.

**The cosine is not the label correlation.** With `z_t = w_t^T x / scale`, each
pair `(z_s, z_t)` is standard bivariate normal with correlation `p = C[s, t]`, and
`y_t = f(z_t) + eps_t` for one function `f(z) = scale z + sum_i sin(alpha_i scale z
+ beta_i)`. By Mehler's expansion in Hermite polynomials, `Cov(f(z_s), f(z_t)) =
sum_{k>=1} k! a_k^2 p^k` with `a_k` the Hermite coefficients of `f`, so the
noise-free label correlation is `rho(p) = sum_k b_k p^k / sum_k b_k` with `b_k >= 0`:
0 at `p = 0`, 1 at `p = 1`, increasing on `[0, 1]`, and `|rho(p)| <= |p|` (a linear `f`
would give `rho = p`; the sinusoids, whose higher Hermite terms decay like `p^k`,
pull it below). The noise multiplies it by `Var f / (Var f + noise^2)`.
`expected_label_correlation` computes `rho` by Gauss-Hermite quadrature;
`label_correlation` measures it on a sample.

References:
    Ma, Zhao, Yi, Chen, Hong and Chi. "Modeling Task Relationships in Multi-task
    Learning with Multi-gate Mixture-of-Experts." KDD 2018, section 3.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

__all__ = [
    "expected_label_correlation",
    "label_correlation",
    "synthetic_heads",
    "synthetic_task_dataset",
    "synthetic_task_names",
    "synthetic_tasks",
]

_QUADRATURE_POINTS = 96


def synthetic_task_names(num_tasks: int) -> list[str]:
    """The task names of `synthetic_tasks`: `["task_0", "task_1", ...]`."""
    return [f"task_{t}" for t in range(_count(num_tasks, "num_tasks", 1))]


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _number(value, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number. Received: {name}={value!r}")
    if value < minimum or (strict and value == minimum):
        sign = ">" if strict else ">="
        raise ValueError(f"`{name}` must be {sign} {minimum}. Received: {name}={value!r}")
    return float(value)


def _cosines(correlation, num_tasks: int) -> np.ndarray:
    """The `T x T` task-cosine matrix from a number or a matrix, checked."""
    if isinstance(correlation, numbers.Real) and not isinstance(correlation, bool):
        p = float(correlation)
        lowest = -1.0 / (num_tasks - 1) if num_tasks > 1 else -1.0
        if not np.isfinite(p) or not lowest - 1e-12 <= p <= 1.0:
            raise ValueError(
                f"`correlation` must be in [{lowest:.4g}, 1] for {num_tasks} tasks (below "
                "-1/(T-1) no set of vectors has that cosine for every pair). "
                f"Received: correlation={correlation!r}"
            )
        return (1.0 - p) * np.eye(num_tasks) + p * np.ones((num_tasks, num_tasks))
    matrix = np.asarray(correlation, dtype=np.float64)
    if matrix.shape != (num_tasks, num_tasks):
        raise ValueError(
            f"`correlation` must be a number or a {num_tasks}x{num_tasks} matrix for "
            f"num_tasks={num_tasks}. Received: correlation of shape {matrix.shape}"
        )
    if not np.all(np.isfinite(matrix)) or not np.allclose(matrix, matrix.T, atol=1e-12):
        raise ValueError(
            "`correlation` must be a finite symmetric matrix. Received: " + np.array2string(matrix)
        )
    if not np.allclose(np.diag(matrix), 1.0, atol=1e-12) or np.any(np.abs(matrix) > 1 + 1e-12):
        raise ValueError(
            "`correlation` must have ones on the diagonal and entries in [-1, 1]. Received: "
            + np.array2string(matrix)
        )
    if np.linalg.eigvalsh(matrix).min() < -1e-9:
        raise ValueError(
            "`correlation` must be positive semidefinite (the cosines of some vectors). Received: "
            + np.array2string(matrix)
        )
    return matrix


def _factor(cosines: np.ndarray) -> np.ndarray:
    """Lower-triangular `L` with `L L^T = cosines`, allowing zero pivots (semidefinite)."""
    n = len(cosines)
    lower = np.zeros_like(cosines)
    for j in range(n):
        pivot = cosines[j, j] - lower[j, :j] @ lower[j, :j]
        lower[j, j] = np.sqrt(max(pivot, 0.0))
        for i in range(j + 1, n):
            rest = cosines[i, j] - lower[i, :j] @ lower[j, :j]
            lower[i, j] = rest / lower[j, j] if lower[j, j] > 1e-12 else 0.0
    return lower


def _task_parameters(num_tasks, input_dim, correlation, scale, num_sinusoids, task_seed):
    num_tasks = _count(num_tasks, "num_tasks", 1)
    input_dim = _count(input_dim, "input_dim", 1)
    if input_dim < num_tasks:
        raise ValueError(
            f"`input_dim` must be at least `num_tasks` ({num_tasks}) to hold {num_tasks} orthogonal "
            f"directions. Received: input_dim={input_dim}"
        )
    scale = _number(scale, "scale", strict=True)
    num_sinusoids = _count(num_sinusoids, "num_sinusoids", 0)
    cosines = _cosines(correlation, num_tasks)
    task_seed = _count(task_seed, "task_seed", 0)
    # Two streams, so that the sinusoids of a task seed do not depend on T or d.
    directions, _ = np.linalg.qr(
        np.random.default_rng([task_seed, 0]).standard_normal((input_dim, num_tasks))
    )
    weights = scale * _factor(cosines) @ directions.T  # (T, d), row t is w_t
    shapes = np.random.default_rng([task_seed, 1]).standard_normal((2, num_sinusoids))
    alpha, beta = shapes[0], shapes[1]
    return weights, alpha, beta, cosines


def _labels(projection, alpha, beta):
    """`f` applied to `w^T x`: the projection plus the sum of sinusoids."""
    return projection + np.sin(projection[..., None] * alpha + beta).sum(axis=-1)


def synthetic_tasks(
    num_tasks: int = 2,
    correlation: float | Sequence[Sequence[float]] = 0.5,
    num_examples: int = 10_000,
    input_dim: int = 100,
    seed: int = 0,
    *,
    task_seed: int = 0,
    scale: float = 1.0,
    num_sinusoids: int = 10,
    noise: float = 0.1,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Regression tasks whose weight vectors have a set cosine (see the module docstring).

    Args:
        num_tasks: number of tasks `T` (named `task_0`, `task_1`, ...).
        correlation: the cosine between every pair of task weight vectors, in
            `[-1/(T-1), 1]`, or a `T x T` positive semidefinite matrix of cosines with ones
            on the diagonal.
        num_examples: number of examples.
        input_dim: input dimension `d` (at least `T`).
        seed: draws the inputs and the label noise.
        task_seed: draws the task directions and the sinusoids: keep it for the train and
            test sets of the same tasks.
        scale: the norm `c` of every weight vector.
        num_sinusoids: the number `m` of sinusoids in each label.
        noise: standard deviation of the label noise.

    Returns:
        `(x, {task: y})`: `x` float32 of shape `(num_examples, input_dim)`, each `y`
        float32 of shape `(num_examples,)`.

    Raises:
        ValueError: on a count that is not a positive integer, `input_dim < num_tasks`, a
            correlation no set of vectors can have, or a negative noise.

    Example:

    >>> x, y = synthetic_tasks(num_tasks=2, correlation=0.9, num_examples=1000, seed=1)
    >>> x.shape, sorted(y)
    ((1000, 100), ['task_0', 'task_1'])
    """
    weights, alpha, beta, _ = _task_parameters(
        num_tasks, input_dim, correlation, scale, num_sinusoids, task_seed
    )
    num_examples = _count(num_examples, "num_examples", 1)
    noise = _number(noise, "noise")
    rng = np.random.default_rng(_count(seed, "seed", 0))
    x = rng.standard_normal((num_examples, weights.shape[1]))
    labels = _labels(x @ weights.T, alpha, beta) + noise * rng.standard_normal((num_examples, len(weights)))
    names = synthetic_task_names(len(weights))
    return x.astype(np.float32), {name: labels[:, t].astype(np.float32) for t, name in enumerate(names)}


def synthetic_task_dataset(
    num_tasks: int = 2,
    correlation: float | Sequence[Sequence[float]] = 0.5,
    num_examples: int = 10_000,
    input_dim: int = 100,
    seed: int = 0,
    *,
    batch_size: int = 128,
    shuffle: bool = True,
    **options,
):
    """`synthetic_tasks` as a `tf.data.Dataset` of `(x, {task: y})` batches.

    The same arguments as `synthetic_tasks` (`options`: `task_seed`, `scale`,
    `num_sinusoids`, `noise`); with `shuffle` the examples are reshuffled every epoch
    from `seed`.
    """
    import tensorflow as tf

    from kmtl.data._checks import check_batch_size

    check_batch_size(batch_size)
    x, y = synthetic_tasks(num_tasks, correlation, num_examples, input_dim, seed, **options)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def synthetic_heads(num_tasks: int = 2) -> list:
    """One `kmtl.heads.Regression` per synthetic task, named as `synthetic_tasks` names them."""
    from kmtl import heads

    return [heads.Regression(name) for name in synthetic_task_names(num_tasks)]


def label_correlation(y: dict[str, np.ndarray]) -> dict[tuple[str, str], float]:
    """The measured Pearson correlation of every pair of tasks' labels.

    Returns:
        `{(task_a, task_b): r}` for each unordered pair, in the order of `y`.
    """
    names = list(y)
    matrix = np.corrcoef(np.stack([np.asarray(y[n], dtype=np.float64).ravel() for n in names]))
    return {(a, b): float(matrix[i, j]) for i, a in enumerate(names) for j, b in enumerate(names) if i < j}


def expected_label_correlation(
    correlation: float,
    *,
    task_seed: int = 0,
    scale: float = 1.0,
    num_sinusoids: int = 10,
    noise: float = 0.1,
) -> float:
    """The population correlation of two synthetic tasks' labels whose weight cosine is `correlation`.

    `Cov(f(z_1), f(z_2)) / (Var f(z) + noise^2)` for standard normals of correlation
    `correlation` (see the module docstring), by Gauss-Hermite quadrature (96 points a
    dimension, exact to float precision for these smooth `f`). The sinusoids are those
    of `task_seed`, so the value is the one `synthetic_tasks(..., task_seed=task_seed)`
    approaches as `num_examples` grows.

    Example:

    >>> round(expected_label_correlation(1.0, noise=0.0), 6)
    1.0
    """
    p = _number(correlation, "correlation", minimum=-1.0)
    if p > 1.0:
        raise ValueError(f"`correlation` must be in [-1, 1]. Received: correlation={correlation!r}")
    _, alpha, beta, _ = _task_parameters(1, 1, 0.0, scale, num_sinusoids, task_seed)
    noise = _number(noise, "noise")
    nodes, weights = np.polynomial.hermite_e.hermegauss(_QUADRATURE_POINTS)
    weights = weights / weights.sum()
    values = _labels(float(scale) * nodes, alpha, beta)
    mean = weights @ values
    variance = weights @ (values - mean) ** 2
    z2 = p * nodes[:, None] + np.sqrt(max(1.0 - p * p, 0.0)) * nodes[None, :]
    second = _labels(float(scale) * z2, alpha, beta)
    covariance = weights @ ((values - mean)[:, None] * (second - mean)) @ weights
    return float(covariance / (variance + noise**2))
