"""Log keys: one function makes them, one structure reads them.

Every per-task entry of kmtl's logs and history is `<task>_<metric>`, with
`val_` in front for validation: `digit_loss`, `digit_accuracy`,
`digit_weight` (the effective task weight in training),
`val_parity_auc`. Keys that belong to no task (`loss`, the static-weighted
total) have no prefix. `key` makes them; `LogKeys` (from a model's heads and
metrics, see `MultiTaskModel.log_keys`) maps keys back to `(task, metric)`
without parsing strings.

Earlier releases logged task weights as `weight_<task>`; `LogKeys.split`
still reads those (histories saved by kmtl 0.1).

Example:

>>> from kmtl import logs
>>> logs.key("digit", "accuracy", validation=True)
'val_digit_accuracy'
>>> keys = logs.LogKeys({"digit": ["loss", "accuracy"], "digit_group": ["loss"]})
>>> keys.split({"digit_group_loss": 0.5, "digit_accuracy": 0.9, "loss": 1.0})
({'digit': {'accuracy': 0.9}, 'digit_group': {'loss': 0.5}}, {'loss': 1.0})
"""

from __future__ import annotations

from typing import Mapping, Sequence

VALIDATION_PREFIX = "val_"


def key(task: str, metric: str, validation: bool = False) -> str:
    """The log key of `metric` of `task`: `<task>_<metric>` (`val_` prefixed)."""
    return f"{VALIDATION_PREFIX if validation else ''}{task}_{metric}"


def legacy_weight_key(task: str) -> str:
    """The task-weight key of kmtl 0.1 (`weight_<task>`), read but no longer written."""
    return f"weight_{task}"


class LogKeys:
    """The log keys of a model: `{task: [metric, ...]}`, and the way back.

    Args:
        metrics: `{task: [metric names]}` (e.g. `["loss", "accuracy",
            "weight"]`), in head order.
    """

    def __init__(self, metrics: Mapping[str, Sequence[str]]):
        self.metrics = {task: list(names) for task, names in metrics.items()}
        self._index = {}
        for task, names in self.metrics.items():
            for metric in names:
                for validation in (False, True):
                    self._index[key(task, metric, validation)] = (task, metric, validation)
            self._index.setdefault(legacy_weight_key(task), (task, "weight", False))

    @property
    def tasks(self) -> list[str]:
        return list(self.metrics)

    def lookup(self, log_key: str):
        """`(task, metric, validation)` of a per-task key, or `None` for any other key."""
        return self._index.get(log_key)

    def series(self, logs: Mapping, metric: str, validation: bool = False) -> dict:
        """`{task: logs[key]}` for every task that logged `metric` (legacy keys included)."""
        out = {}
        for task in self.metrics:
            for candidate in (key(task, metric, validation),) + (
                (legacy_weight_key(task),) if metric == "weight" and not validation else ()
            ):
                if candidate in logs:
                    out[task] = logs[candidate]
                    break
        return out

    def split(self, logs: Mapping, validation: bool = False):
        """Splits logs into `({task: {metric: value}}, {other key: value})`.

        Only keys of the requested kind (training, or `val_` with
        `validation=True`) are kept; a key of the other kind is dropped.
        """
        tasks = {t: {} for t in self.metrics}
        other = {}
        for log_key, value in logs.items():
            found = self.lookup(log_key)
            if found is not None:
                task, metric, is_validation = found
                if is_validation == validation:
                    tasks[task][metric] = value
                continue
            is_validation = log_key.startswith(VALIDATION_PREFIX)
            if is_validation == validation:
                other[log_key[len(VALIDATION_PREFIX) :] if validation else log_key] = value
        return {t: m for t, m in tasks.items() if m}, other

    @classmethod
    def infer(cls, logs: Mapping, tasks: Sequence[str]) -> "LogKeys":
        """`LogKeys` for a history read from disk, given its task names.

        A key `<task>_<metric>` is given to the longest matching task name, so
        that `digit_group_loss` belongs to `digit_group`, not `digit`.
        """
        ordered = sorted(tasks, key=len, reverse=True)
        metrics = {t: [] for t in tasks}
        for log_key in logs:
            bare = log_key[len(VALIDATION_PREFIX) :] if log_key.startswith(VALIDATION_PREFIX) else log_key
            if bare.startswith("weight_") and bare[len("weight_") :] in metrics:
                continue
            for task in ordered:
                if bare.startswith(task + "_"):
                    metric = bare[len(task) + 1 :]
                    if metric not in metrics[task]:
                        metrics[task].append(metric)
                    break
        return cls(metrics)

    def __repr__(self):
        return f"LogKeys({self.metrics})"


__all__ = ["LogKeys", "VALIDATION_PREFIX", "key", "legacy_weight_key"]
