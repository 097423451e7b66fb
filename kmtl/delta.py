"""Δm and Δp: the relative performance change of a multi-task model against baselines.

`delta_m(results, baselines)` returns a `Delta` with both published
conventions; `direction(metric)` says whether a higher value of a metric is
better by the tables `HIGHER_IS_BETTER` and `LOWER_IS_BETTER`. Also
available as `kmtl.evaluation.delta_m` and `kmtl.delta_m`.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping

#: Metric names for which a higher value is better (default of `delta_m`):
#: a metric matches an entry when its name equals it or ends in `_<entry>`
#: (`sparse_top_k_categorical_accuracy`, `macro_f1`).
HIGHER_IS_BETTER = ("accuracy", "auc", "precision", "recall", "f1", "f1_score")

#: Metric names for which a lower value is better (default of `delta_m`),
#: matched the same way (`root_mean_squared_error`, `binary_crossentropy`).
LOWER_IS_BETTER = (
    "loss",
    "mae",
    "mse",
    "rmse",
    "mean_absolute_error",
    "mean_squared_error",
    "error",
    "crossentropy",
)


@dataclasses.dataclass(frozen=True)
class Delta:
    """The relative performance change of a multi-task model, in both conventions.

    Made by `kmtl.evaluation.delta_m`; every value is in percent.

    Attributes:
        delta_m: Δm, the mean of `terms` over all compared (task, metric)
            pairs. **Positive means worse** (Maninis et al. 2019; Nash-MTL,
            FAMO).
        delta_p: Δp, the mean over tasks of the mean over the task's metrics
            of the improvements (`-terms`). **Positive means better**
            (LibMTL). Equal to `-delta_m` when every task has the same number
            of metrics.
        terms: `{(task, metric): (-1)^δ (M - B) / |B| * 100}` with δ = 1 when
            higher is better: each pair's term of Δm (positive = worse).
        higher_is_better: `{(task, metric): bool}`, the direction used.

    Example:

    >>> import kmtl
    >>> d = kmtl.delta_m({"digit": {"accuracy": 0.99}}, {"digit": {"accuracy": 0.90}})
    >>> round(d.delta_m, 2), round(d.delta_p, 2), d.compared
    (-10.0, 10.0, 1)
    """

    delta_m: float
    delta_p: float
    terms: Mapping[tuple[str, str], float]
    higher_is_better: Mapping[tuple[str, str], bool]

    @property
    def compared(self) -> int:
        """The number of compared (task, metric) pairs."""
        return len(self.terms)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The compared tasks, in order."""
        return tuple(dict.fromkeys(task for task, _ in self.terms))

    def __str__(self):
        metrics = f"{self.compared} metric" + ("s" if self.compared != 1 else "")
        tasks = f"{len(self.tasks)} task" + ("s" if len(self.tasks) != 1 else "")
        return (
            f"Δm = {self.delta_m:+.2f}% (lower is better) · Δp = {self.delta_p:+.2f}% (higher is better)"
            f" over {metrics} of {tasks}"
        )


def direction(metric: str) -> bool | None:
    """Whether a higher `metric` is better by the default tables: True, False, or None if in neither."""
    matches = [(len(e), True) for e in HIGHER_IS_BETTER if metric == e or metric.endswith("_" + e)]
    matches += [(len(e), False) for e in LOWER_IS_BETTER if metric == e or metric.endswith("_" + e)]
    return max(matches)[1] if matches else None


def _rows(table: Mapping, side: str) -> dict:
    """`{task: {metric: value}}` without the "overall" row, checked to be mappings."""
    if not isinstance(table, Mapping):
        raise ValueError(
            f"`{side}` must be a mapping {{task: {{metric: value}}}} (e.g. a `kmtl.Report`). "
            f"Received: {side}={table!r}"
        )
    rows = {}
    for task in table:
        if task == "overall":
            continue
        row = table[task]
        if not isinstance(row, Mapping):
            raise ValueError(
                f"Each task of `{side}` must map metric names to values. Received: {side}[{task!r}]={row!r}"
            )
        rows[task] = row
    return rows


def _number(value, side: str, task: str, metric: str) -> float:
    label = "Baseline" if side == "baselines" else "Result"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{label} {task}/{metric} must be a number. Received: {side}[{task!r}][{metric!r}]={value!r}"
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"{label} {task}/{metric} must be finite. Received: {number}")
    return number


def _pairs(results: dict, baselines: dict, metrics: Mapping | None) -> list[tuple[str, str]]:
    """The (task, metric) pairs to compare, in order."""
    if metrics is None:
        missing = [t for t in baselines if t not in results]
        extra = [t for t in results if t not in baselines]
        if missing or extra:
            raise ValueError(
                "`results` and `baselines` must have the same tasks (pass `metrics` to compare a subset). "
                f"Received: tasks only in baselines={missing}, only in results={extra}"
            )
        pairs = []
        for task, row in baselines.items():
            names = [m for m in row if m in results[task] and m != "loss"]
            if not names:
                raise ValueError(
                    f"Task {task!r} has no metric other than `loss` on both sides. "
                    f"Received: results[{task!r}]={list(results[task])}, baselines[{task!r}]={list(row)}"
                )
            pairs += [(task, m) for m in names]
        return pairs
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"`metrics` must be a mapping {{task: [metric names]}}. Received: metrics={metrics!r}"
        )
    pairs = []
    for task, names in metrics.items():
        if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"`metrics[{task!r}]` must be a non-empty list of metric names. Received: {names!r}"
            )
        for side, rows in (("results", results), ("baselines", baselines)):
            if task not in rows:
                raise ValueError(
                    f"Task {task!r} of `metrics` is not in `{side}`. Received: {side} tasks={list(rows)}"
                )
            for name in names:
                if name not in rows[task]:
                    raise ValueError(
                        f"Metric {name!r} of task {task!r} is missing from `{side}`. "
                        f"Received: {side}[{task!r}] metrics={list(rows[task])}"
                    )
        pairs += [(task, name) for name in names]
    return pairs


def directions(pairs: list, higher_is_better: Mapping | None = None, remedy: str | None = None) -> dict:
    """`{(task, metric): bool}` (True: higher is better) of `(task, metric)` pairs.

    A `"task/metric"` key of `higher_is_better` first, then a bare metric key, then the
    tables `HIGHER_IS_BETTER` / `LOWER_IS_BETTER` (see `direction`). Shared by `delta_m`,
    the static-weight sweep and `kmtl.search`.

    Args:
        pairs: the compared `(task, metric)` pairs.
        higher_is_better: optional overrides, as for `delta_m`.
        remedy: what the caller's user should do about a metric of unknown direction
            (default: pass `higher_is_better`).

    Raises:
        ValueError: for a malformed override, or a metric whose direction is unknown.
    """
    if higher_is_better is not None and not isinstance(higher_is_better, Mapping):
        raise ValueError(
            f"`higher_is_better` must be a mapping {{metric: bool}}. Received: higher_is_better={higher_is_better!r}"
        )
    overrides = dict(higher_is_better or {})
    compared = {f"{t}/{m}" for t, m in pairs} | {m for _, m in pairs}
    for key, value in overrides.items():
        if not isinstance(value, bool):
            raise ValueError(f"`higher_is_better` values must be True or False. Received: {key!r}: {value!r}")
        if key not in compared:
            raise ValueError(
                f"`higher_is_better` key {key!r} names no compared metric (use 'metric' or 'task/metric'). "
                f"Received: {key!r}; compared: {sorted(compared)}"
            )
    found = {}
    for task, metric in pairs:
        higher = overrides.get(f"{task}/{metric}", overrides.get(metric, direction(metric)))
        if higher is None:
            hint = remedy or (
                f'pass higher_is_better={{"{metric}": True|False}} (or "{task}/{metric}" for this task only)'
            )
            raise ValueError(
                f"Cannot tell whether a higher or a lower {metric!r} is better (task {task!r}): {hint}. "
                f"Received: {task}/{metric}"
            )
        found[(task, metric)] = higher
    return found


def delta_m(
    results: Mapping,
    baselines: Mapping,
    higher_is_better: Mapping[str, bool] | None = None,
    metrics: Mapping[str, list[str]] | None = None,
) -> Delta:
    """Relative performance change of a multi-task model: Δm and Δp (in %).

    For each compared (task, metric) pair k with multi-task value M_k and
    single-task baseline B_k:

        term_k = (-1)^δ_k (M_k - B_k) / |B_k| * 100,   δ_k = 1 if higher is better
        Δm = mean_k term_k                                  (positive = worse)
        Δp = mean_t ( mean_{m of t} -term_{t,m} )           (positive = better)

    Δm is the per-metric mean of Maninis et al. (2019), the number Nash-MTL
    and FAMO report. Δp is LibMTL's `count_improvement` (`LibMTL/utils.py`):
    it averages `(-1)^w (B - N) / B` over each task's metrics with w = 1 for
    higher-is-better (LibMTL's `weight`), then averages over the tasks, so
    every task counts once however many metrics it has. kmtl returns it in
    percent (LibMTL's function returns the fraction) and divides by |B|
    where LibMTL divides by B: the two agree for every positive baseline,
    and for a negative one kmtl keeps "positive = better".

    Args:
        results: `{task: {metric: value}}` of the multi-task model: a mapping
            or a `kmtl.Report`. A row named `"overall"` is skipped.
        baselines: the same form, for the single-task models.
        higher_is_better: optional `{key: bool}`; a key is a metric name
            (`"accuracy"`, every task) or `"task/metric"` (one task, which
            takes precedence). Metrics not named use the default tables
            `HIGHER_IS_BETTER` (accuracy, auc, precision, recall, f1,
            f1_score) and `LOWER_IS_BETTER` (loss, mae, mse, rmse,
            mean_absolute_error, mean_squared_error, error, crossentropy):
            a name matches an entry it equals or ends in as `_<entry>`
            (`top_k_categorical_accuracy`, `root_mean_squared_error`).
        metrics: optional `{task: [metric names]}` to compare only these;
            tasks not listed are ignored on both sides. Default: every task,
            with every metric both sides share except `loss`.

    Returns:
        A `Delta` with `delta_m`, `delta_p`, the per-pair `terms` and the
        `higher_is_better` directions used; `str()` prints both numbers.

    Raises:
        ValueError: when, without `metrics`, a task is on one side only or a
            task shares no metric but `loss`; when a task or metric named by
            `metrics` is missing from a side; for a baseline that is zero or
            not finite, a result that is not finite, nothing to compare, a
            `higher_is_better` value that is not a bool or a key that names
            no compared metric, and a metric in neither default table that
            `higher_is_better` does not name.

    Example:

    >>> import kmtl
    >>> d = kmtl.evaluation.delta_m(
    ...     {"digit": {"accuracy": 0.99}, "value": {"mae": 0.5}},
    ...     {"digit": {"accuracy": 0.90}, "value": {"mae": 1.0}})
    >>> print(d)
    Δm = -30.00% (lower is better) · Δp = +30.00% (higher is better) over 2 metrics of 2 tasks

    References:
        Maninis, K.-K., Radosavovic, I., & Kokkinos, I. (2019). Attentive
        Single-Tasking of Multiple Tasks. CVPR.
        Lin, B., & Zhang, Y. (2023). LibMTL: A Python Library for Deep
        Multi-Task Learning. JMLR 24(209).
    """
    results_rows = _rows(results, "results")
    baseline_rows = _rows(baselines, "baselines")
    pairs = _pairs(results_rows, baseline_rows, metrics)
    if not pairs:
        raise ValueError(
            "Nothing to compare: no (task, metric) pair. "
            f"Received: results tasks={list(results_rows)}, baselines tasks={list(baseline_rows)}, metrics={metrics!r}"
        )
    higher = directions(pairs, higher_is_better)
    terms = {}
    for task, metric in pairs:
        base = _number(baseline_rows[task][metric], "baselines", task, metric)
        if base == 0:
            raise ValueError(
                f"Baseline {task}/{metric} must be non-zero (Δm divides by it). Received: {base}"
            )
        value = _number(results_rows[task][metric], "results", task, metric)
        sign = -1.0 if higher[(task, metric)] else 1.0
        terms[(task, metric)] = 100.0 * sign * (value - base) / abs(base)
    per_task = {}
    for (task, _), term in terms.items():
        per_task.setdefault(task, []).append(-term)
    return Delta(
        delta_m=sum(terms.values()) / len(terms),
        delta_p=sum(sum(v) / len(v) for v in per_task.values()) / len(per_task),
        terms=types.MappingProxyType(terms),
        higher_is_better=types.MappingProxyType(higher),
    )


__all__ = ["Delta", "HIGHER_IS_BETTER", "LOWER_IS_BETTER", "delta_m", "direction", "directions"]
