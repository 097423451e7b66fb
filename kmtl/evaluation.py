"""Per-task evaluation reports; Δm and Δp (`kmtl.delta`) and the baselines (`kmtl.baselines`)."""

from __future__ import annotations

from collections.abc import Mapping

import keras

from kmtl import logs as logs_module


class Report(Mapping):
    """Per-task metrics: a read-only mapping `{task: {metric: value}}`.

    The key `"overall"` holds the metrics that belong to no single task
    (the weighted total `loss`). Print it for a table; `to_dict()` and
    `to_markdown()` give plain forms.

    Example:

    >>> r = Report({"digit": {"accuracy": 0.99, "loss": 0.03}}, {"loss": 0.03})
    >>> r["digit"]["accuracy"]
    0.99
    """

    def __init__(self, tasks: dict, overall: dict | None = None):
        self._tasks = {t: dict(m) for t, m in tasks.items()}
        self._overall = dict(overall or {})

    def __getitem__(self, key):
        if key == "overall":
            return dict(self._overall)
        if key not in self._tasks:
            raise KeyError(f"No task {key!r} in this report. Tasks: {list(self._tasks)}")
        return dict(self._tasks[key])

    def __iter__(self):
        return iter(self._tasks)

    def __len__(self):
        return len(self._tasks)

    @property
    def overall(self) -> dict:
        return dict(self._overall)

    def metric_names(self) -> list[str]:
        names = []
        for metrics in self._tasks.values():
            names.extend(m for m in metrics if m not in names)
        return names

    def to_dict(self) -> dict:
        """`{task: {metric: float}, "overall": {...}}` (JSON-ready)."""
        out = {t: dict(m) for t, m in self._tasks.items()}
        if self._overall:
            out["overall"] = dict(self._overall)
        return out

    def _rows(self):
        columns = self.metric_names()
        rows = [["task"] + columns]
        for task, metrics in self._tasks.items():
            rows.append([task] + [_fmt(metrics.get(c)) for c in columns])
        return rows

    def to_markdown(self) -> str:
        rows = self._rows()
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        if self._overall:
            lines.append("")
            lines.append(", ".join(f"{k}: {_fmt(v)}" for k, v in self._overall.items()))
        return "\n".join(lines)

    def __str__(self):
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self._overall:
            lines.append("overall: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self._overall.items()))
        return "\n".join(lines)

    __repr__ = __str__


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}"


def report_from_logs(logs: dict, task_names=None, prefix: str = "", log_keys=None) -> Report:
    """Splits Keras logs (`digit_accuracy`, `loss`, ...) into a `Report`.

    Args:
        logs: a dict of logs (from `evaluate(return_dict=True)` or a history).
        task_names: the tasks, used only when `log_keys` is not given (the
            keys are then matched to the longest task name they start with).
        prefix: `"val_"` to read validation logs.
        log_keys: a `kmtl.logs.LogKeys` (e.g. `model.log_keys()`).

    Task weights (`<task>_weight`) are training logs, not metrics: they are
    left out.
    """
    if log_keys is None:
        log_keys = logs_module.LogKeys.infer(logs, list(task_names or []))
    tasks, overall = log_keys.split(logs, validation=prefix == logs_module.VALIDATION_PREFIX)
    report = {t: {} for t in log_keys.tasks}
    for task, metrics in tasks.items():
        report[task] = {m: float(v) for m, v in metrics.items() if m != "weight"}
    return Report(report, {k: float(v) for k, v in overall.items()})


def evaluate(model: keras.Model, dataset, **kwargs) -> Report:
    """Evaluates a multi-task model and returns a per-task `Report`.

    Args:
        model: a compiled dict-output model (e.g. a `kmtl.MultiTaskModel`).
        dataset: a `tf.data.Dataset` yielding `(x, {task: y})` or
            `(x, {task: y}, {task: sample_weight})`.
        **kwargs: passed to `model.evaluate` (e.g. `steps`, `verbose`).

    Returns:
        A `Report` `{task: {metric: value}}`; `report.overall["loss"]` is the
        weighted total loss.

    Raises:
        ValueError: if the model is not compiled.
    """
    if not getattr(model, "compiled", False):
        raise ValueError("`kmtl.evaluate` needs a compiled model: call `model.compile()` first.")
    kwargs.setdefault("verbose", 0)
    logs = model.evaluate(dataset, return_dict=True, **kwargs)
    if hasattr(model, "log_keys"):
        return report_from_logs(logs, log_keys=model.log_keys())
    return report_from_logs(logs, list(model.output_names))


# Δm and Δp live in `kmtl.delta`, the two baselines of a comparison in `kmtl.baselines`
# (they train through `kmtl.experiment`); both are part of this module's API.
from kmtl.baselines import Baselines, Sweep, single_task_baselines, static_weight_sweep  # noqa: E402
from kmtl.delta import HIGHER_IS_BETTER, LOWER_IS_BETTER, Delta, delta_m  # noqa: E402

__all__ = [
    "Baselines",
    "Delta",
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "Report",
    "Sweep",
    "delta_m",
    "evaluate",
    "report_from_logs",
    "single_task_baselines",
    "static_weight_sweep",
]
