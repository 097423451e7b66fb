"""Plots of multi-task training: per-task curves and task weights over time."""

from __future__ import annotations

from collections.abc import Mapping


def _history_dict(history) -> dict:
    logs = getattr(history, "history", history)
    if not isinstance(logs, Mapping):
        raise ValueError(f"Expected a keras History or a dict of lists. Received: {type(history).__name__}")
    return dict(logs)


def _tasks_from(logs, suffix: str) -> list[str]:
    return [k[: -len(suffix)] for k in logs if k.endswith(suffix) and not k.startswith("val_")]


def plot_history(history, metrics=("loss", "accuracy"), tasks=None, figsize=None):
    """Per-task training (solid) and validation (dashed) curves, one panel per metric.

    Args:
        history: a `keras.callbacks.History` or its `.history` dict.
        metrics: metric suffixes to plot, e.g. `("loss", "accuracy")`.
            Metrics no task has are skipped.
        tasks: task names; default: every task found in the history.
        figsize: matplotlib figure size.

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        ValueError: if none of `metrics` appears in the history.
    """
    import matplotlib.pyplot as plt

    logs = _history_dict(history)
    panels = []
    for metric in metrics:
        found = [t for t in (tasks or _tasks_from(logs, f"_{metric}")) if f"{t}_{metric}" in logs]
        found = [t for t in found if not t.startswith("weight")]
        if found:
            panels.append((metric, found))
    if not panels:
        raise ValueError(f"None of the metrics {list(metrics)} is in the history. Keys: {sorted(logs)}")
    fig, axes = plt.subplots(1, len(panels), figsize=figsize or (5 * len(panels), 3.5), squeeze=False)
    for ax, (metric, found) in zip(axes[0], panels):
        for i, task in enumerate(found):
            color = f"C{i}"
            values = logs[f"{task}_{metric}"]
            epochs = range(1, len(values) + 1)
            ax.plot(epochs, values, color=color, label=f"{task}")
            if f"val_{task}_{metric}" in logs:
                ax.plot(
                    epochs, logs[f"val_{task}_{metric}"], color=color, linestyle="--", label=f"{task} (val)"
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"per-task {metric}")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_task_weights(history, figsize=(5, 3.5)):
    """The effective task weights (`weight_<task>` in the history) per epoch.

    Raises:
        ValueError: if the history has no task weights.
    """
    import matplotlib.pyplot as plt

    logs = _history_dict(history)
    keys = [k for k in logs if k.startswith("weight_")]
    if not keys:
        raise ValueError(f"The history has no task weights (weight_<task>). Keys: {sorted(logs)}")
    fig, ax = plt.subplots(figsize=figsize)
    for key in keys:
        ax.plot(range(1, len(logs[key]) + 1), logs[key], marker="o", label=key[len("weight_") :])
    ax.set_xlabel("epoch")
    ax.set_ylabel("task weight")
    ax.set_title("task weights")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


__all__ = ["plot_history", "plot_task_weights"]
