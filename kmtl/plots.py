"""Plots of multi-task training: per-task curves and task weights over time."""

from __future__ import annotations

from collections.abc import Mapping


def _history_dict(history) -> dict:
    logs = getattr(history, "history", history)
    if not isinstance(logs, Mapping):
        raise ValueError(f"Expected a keras History or a dict of lists. Received: {type(history).__name__}")
    return dict(logs)


def _log_keys(history, logs, tasks):
    """The history's `LogKeys`: from its model when it has one, else inferred from `tasks`."""
    from kmtl import logs as logs_module

    model = getattr(history, "model", None)
    if model is not None and hasattr(model, "log_keys"):
        return model.log_keys()
    if tasks is None:
        raise ValueError(
            "A history dict read from disk needs `tasks=[...]` (its task names) to be split per task. "
            f"Received: keys {sorted(logs)}"
        )
    return logs_module.LogKeys.infer(logs, list(tasks))


def plot_history(history, metrics=("loss", "accuracy"), tasks=None, figsize=None):
    """Per-task training (solid) and validation (dashed) curves, one panel per metric.

    Args:
        history: a `keras.callbacks.History` or its `.history` dict.
        metrics: metric suffixes to plot, e.g. `("loss", "accuracy")`.
            Metrics no task has are skipped.
        tasks: task names; needed for a plain dict (e.g. `history.json`),
            default for a `History`: its model's tasks.
        figsize: matplotlib figure size.

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        ValueError: if none of `metrics` appears in the history.
    """
    import matplotlib.pyplot as plt

    logs = _history_dict(history)
    keys = _log_keys(history, logs, tasks)
    panels = []
    for metric in metrics:
        train = keys.series(logs, metric)
        if tasks is not None:
            train = {t: v for t, v in train.items() if t in tasks}
        if train:
            panels.append((metric, train, keys.series(logs, metric, validation=True)))
    if not panels:
        raise ValueError(f"None of the metrics {list(metrics)} is in the history. Keys: {sorted(logs)}")
    fig, axes = plt.subplots(1, len(panels), figsize=figsize or (5 * len(panels), 3.5), squeeze=False)
    for ax, (metric, train, validation) in zip(axes[0], panels):
        for i, (task, values) in enumerate(train.items()):
            color = f"C{i}"
            epochs = range(1, len(values) + 1)
            # Markers, so that a one-epoch history still shows its points.
            ax.plot(epochs, values, color=color, marker="o", label=f"{task}")
            if task in validation:
                ax.plot(
                    epochs, validation[task], color=color, linestyle="--", marker="s", label=f"{task} (val)"
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"per-task {metric}")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_task_weights(history, tasks=None, figsize=(5, 3.5)):
    """The effective task weights (`<task>_weight` in the history) per epoch.

    Args:
        history: a `keras.callbacks.History` or its `.history` dict (then
            `tasks` is needed; `weight_<task>` keys of kmtl 0.1 are read too).
        tasks: task names (default for a `History`: its model's tasks).

    Raises:
        ValueError: if the history has no task weights.
    """
    import matplotlib.pyplot as plt

    logs = _history_dict(history)
    series = _log_keys(history, logs, tasks).series(logs, "weight")
    if not series:
        raise ValueError(f"The history has no task weights (<task>_weight). Keys: {sorted(logs)}")
    fig, ax = plt.subplots(figsize=figsize)
    for task, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=task)
    ax.set_xlabel("epoch")
    ax.set_ylabel("task weight")
    ax.set_title("task weights")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


__all__ = ["plot_history", "plot_task_weights"]
