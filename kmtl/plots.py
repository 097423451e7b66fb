"""Plots of multi-task training: per-task curves, task weights, task relationships.

`plot_history` and `plot_task_weights` draw per-task series over epochs;
`plot_affinity` draws the `[T, T]` inter-task affinity of
`kmtl.diagnostics.task_affinity`, and `plot_pairwise_over_time` the pairwise
values that `GradientConflictMonitor` and `TaskAffinityMonitor` logged, epoch
by epoch; `plot_tradeoff` draws the two-task trade-off plane (methods, the
single-task point and the static-weight front). Every function returns the
`matplotlib.figure.Figure`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np


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


def _diverging_colormap():
    """Red (negative) to blue (positive) through white at 0; unmeasured cells grey."""
    import matplotlib

    return matplotlib.colormaps["RdBu"].with_extremes(bad="lightgrey")


def _symmetric_limit(values) -> float:
    """The colour limit of a diverging map centred at 0: the largest magnitude (1 if none)."""
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def plot_affinity(affinity, tasks=None, ax=None, figsize=None):
    """The inter-task affinity as a T x T heatmap: source task on rows, target on columns.

    Cell (i, j) is Z_{i→j} of `kmtl.diagnostics.task_affinity`: positive
    (blue) when a step for task i lowers task j's loss, negative (red) when
    it raises it. The colour map is diverging and centred at 0; every value
    is written in its cell; the diagonal (not measured) is grey.

    Args:
        affinity: the dict of `task_affinity` (`{(source, target): Z}`) or a
            `[T, T]` array (e.g. from `kmtl.diagnostics.affinity_matrix`).
        tasks: task order / names (default: the dict's order; for an array,
            `"0"`, `"1"`, ...).
        ax: a matplotlib `Axes` to draw on (default: a new figure).
        figsize: size of the new figure (ignored with `ax`).

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        ValueError: for an empty dict, unknown tasks or a non-square array
            (see `kmtl.diagnostics.affinity_matrix`).

    Example:

    >>> affinity = kmtl.diagnostics.task_affinity(model, test.take(8))   # doctest: +SKIP
    >>> kmtl.plots.plot_affinity(affinity).savefig("affinity.png")       # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    from kmtl import diagnostics

    matrix, names = diagnostics.affinity_matrix(affinity, tasks)
    size = len(names)
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize or (2.5 + 1.1 * size, 1.8 + 0.9 * size))
        own_figure = True
    else:
        fig, own_figure = ax.figure, False
    limit = _symmetric_limit(matrix)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=_diverging_colormap(), vmin=-limit, vmax=limit)
    for i, j in itertools.product(range(size), repeat=2):
        value = matrix[i, j]
        if np.isfinite(value):
            color = "white" if abs(value) > 0.6 * limit else "black"
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", color=color, fontsize="small")
    ax.set_xticks(range(size), names, rotation=45, ha="right")
    ax.set_yticks(range(size), names)
    ax.set_xlabel("target task (loss after the step)")
    ax.set_ylabel("source task (step taken)")
    ax.set_title("inter-task affinity")
    fig.colorbar(image, ax=ax, label="affinity")
    if own_figure:
        fig.tight_layout()
    return fig


def _pairwise_keys(history, logs, kind, tasks):
    """`[(log key, row label)]` of the pairwise series of `kind` in the history."""
    from kmtl import diagnostics

    if kind == "cos":
        key, pairs, arrow, prefix = (
            diagnostics.cosine_key,
            itertools.combinations,
            " · ",
            diagnostics.COSINE_PREFIX,
        )
    else:
        key, pairs, arrow, prefix = (
            diagnostics.affinity_key,
            itertools.permutations,
            " → ",
            diagnostics.AFFINITY_PREFIX,
        )
    if tasks is None:
        objective = getattr(getattr(history, "model", None), "objective", None)
        tasks = getattr(objective, "task_names", None)
    if tasks is not None:
        # Keys made from the task names, never parsed back out of the strings.
        candidates = [(key(a, b), f"{a}{arrow}{b}") for a, b in pairs(list(tasks), 2)]
        return [(k, label) for k, label in candidates if k in logs]
    return [(k, k[len(prefix) :]) for k in logs if k.startswith(prefix)]


def plot_pairwise_over_time(history, kind="cos", tasks=None, ax=None, figsize=None):
    """Every logged task pair over time as a heatmap: one row per pair, one column per epoch.

    Reads the gradient cosines (`kind="cos"`, keys `cos_<a>_<b>` of
    `kmtl.diagnostics.GradientConflictMonitor`) or the lookahead affinities
    (`kind="affinity"`, keys `affinity_<source>_<target>` of
    `kmtl.diagnostics.TaskAffinityMonitor`). The colour map is diverging and
    centred at 0 (cosines on [-1, 1]). The columns are epochs when every
    epoch was measured, else the measurements in order (a monitor with
    `every > 1` logs nothing on the epochs it skips).

    Args:
        history: a `keras.callbacks.History` or its `.history` dict.
        kind: `"cos"` or `"affinity"`.
        tasks: task names, to pick exactly their pairs (default for a
            `History`: its model's trained tasks; for a dict: every key
            with the kind's prefix, labelled by the rest of the key).
        ax: a matplotlib `Axes` to draw on (default: a new figure).
        figsize: size of the new figure (ignored with `ax`).

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        ValueError: for an unknown `kind`, or a history without such keys.

    Example:

    >>> history = model.fit(train, epochs=5, callbacks=[kmtl.diagnostics.GradientConflictMonitor(val)])  # doctest: +SKIP
    >>> kmtl.plots.plot_pairwise_over_time(history, kind="cos").savefig("cosines.png")          # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    if kind not in ("cos", "affinity"):
        raise ValueError(f"`kind` must be 'cos' or 'affinity'. Received: kind={kind!r}")
    logs = _history_dict(history)
    rows = _pairwise_keys(history, logs, kind, tasks)
    if not rows:
        example = "cos_<a>_<b>" if kind == "cos" else "affinity_<source>_<target>"
        raise ValueError(f"The history has no {kind} keys ({example}). Received: keys {sorted(logs)}")
    series = [np.asarray(logs[k], dtype="float64").ravel() for k, _ in rows]
    length = max(len(s) for s in series)
    matrix = np.full((len(rows), length), np.nan)
    for row, values in zip(matrix, series):
        row[: len(values)] = values
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize or (3.0 + 0.5 * length, 1.5 + 0.4 * len(rows)))
        own_figure = True
    else:
        fig, own_figure = ax.figure, False
    limit = 1.0 if kind == "cos" else _symmetric_limit(matrix)
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        cmap=_diverging_colormap(),
        vmin=-limit,
        vmax=limit,
        aspect="auto",
        interpolation="nearest",
    )
    epochs = len(logs.get("loss", ())) == length
    ticks = range(0, length, max(1, length // 10))
    ax.set_xticks(list(ticks), [str(t + 1) for t in ticks])
    ax.set_xlabel("epoch" if epochs else "measurement")
    ax.set_yticks(range(len(rows)), [label for _, label in rows])
    ax.set_title("gradient cosines" if kind == "cos" else "inter-task affinity (source → target)")
    fig.colorbar(image, ax=ax, label="cosine" if kind == "cos" else "affinity")
    if own_figure:
        fig.tight_layout()
    return fig


def _point(row, tasks, metric, what):
    try:
        return float(row[tasks[0]][metric]), float(row[tasks[1]][metric])
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"{what} must map each of the tasks {list(tasks)} to a {metric!r} value. Received: {row!r} "
            f"(missing {error})"
        ) from None


def plot_tradeoff(
    methods: Mapping,
    tasks=None,
    metric: str = "accuracy",
    spread: Mapping | None = None,
    single_task: Mapping | None = None,
    single_task_spread: Mapping | None = None,
    sweep=None,
    references: Mapping | None = None,
    ax=None,
    figsize=(7.5, 4.8),
):
    """The two-task trade-off plane: each method's point, the single-task point, the static front.

    The picture of Sener & Koltun (2018, Fig. 3): task A's `metric` on the
    x axis, task B's on the y axis. Each method is a point at its mean with
    error bars of its spread over seeds; the single-task baselines are one
    star at (A alone, B alone); the static-weight sweep's candidates are
    small grey dots, its Pareto front a dashed line and its chosen (on
    validation) candidate a ringed dot; published references are hollow
    squares in the colour of the method whose name ends their label (black
    otherwise). The legend sits right
    of the axes.

    Args:
        methods: `{name: {task: {metric: mean}}}`, e.g. each
            `kmtl.experiment.Result.mean`.
        tasks: the two tasks `(x task, y task)`; default: the first two of
            the first method.
        metric: the metric of both axes.
        spread: `{name: {task: {metric: std}}}` for error bars (optional).
        single_task: `{task: {metric: mean}}`, e.g. `Baselines.mean`.
        single_task_spread: its standard deviations (optional).
        sweep: a `kmtl.evaluation.Sweep` run with `test=True` (its test
            scores are drawn; the choice was made on validation).
        references: `{label: (x, y)}` published numbers drawn beside kmtl's.
        ax: a matplotlib `Axes` to draw on (default: a new figure).
        figsize: size of the new figure (ignored with `ax`).

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        ValueError: for an empty `methods`, a method, baseline or spread
            that lacks a task or the metric, or a sweep without test scores.

    Example:

    >>> fig = kmtl.plots.plot_tradeoff({"equal": {"left": {"accuracy": 0.95}, "right": {"accuracy": 0.93}}},
    ...                                single_task={"left": {"accuracy": 0.96}, "right": {"accuracy": 0.94}})
    """
    import matplotlib.pyplot as plt

    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(
            f"`methods` must be a non-empty mapping {{name: {{task: {{metric: value}}}}}}. Received: {methods!r}"
        )
    if tasks is None:
        first = next(iter(methods.values()))
        tasks = [t for t in first if t != "overall"][:2]
    tasks = list(tasks)
    if len(tasks) != 2:
        raise ValueError(f"The trade-off plane needs exactly two tasks. Received: tasks={tasks!r}")
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        own_figure = True
    else:
        fig, own_figure = ax.figure, False
    if sweep is not None:
        if sweep.test is None:
            raise ValueError("`sweep` has no test scores: run the sweep with test=True.")
        points = np.asarray([_point(row, tasks, metric, "each sweep candidate") for row in sweep.test])
        front = sweep.front(metric=metric)
        ax.scatter(points[:, 0], points[:, 1], s=18, color="0.6", zorder=2, label="static weights (sweep)")
        ordered = points[sorted(front, key=lambda i: points[i, 0])]
        ax.plot(ordered[:, 0], ordered[:, 1], "--", color="0.45", lw=1, zorder=2, label="static front")
        chosen = points[sweep.chosen]
        ax.scatter(
            [chosen[0]],
            [chosen[1]],
            s=90,
            facecolors="none",
            edgecolors="0.2",
            zorder=3,
            label="static, chosen on validation",
        )
    colours = plt.get_cmap("tab10")

    def draw(point, err, **style):
        """One point with its error bars (`err`: (x std, y std) or None)."""
        xerr, yerr = (None, None) if err is None else ([err[0]], [err[1]])
        ax.errorbar([point[0]], [point[1]], xerr=xerr, yerr=yerr, capsize=2, **style)

    for index, (name, row) in enumerate(methods.items()):
        err = None
        if spread is not None and name in spread:
            err = _point(spread[name], tasks, metric, f"the spread of {name!r}")
        point = _point(row, tasks, metric, f"method {name!r}")
        draw(point, err, fmt="o", ms=6, color=colours(index % 10), zorder=4, label=name)
    if single_task is not None:
        err = None
        if single_task_spread:
            err = _point(single_task_spread, tasks, metric, "`single_task_spread`")
        point = _point(single_task, tasks, metric, "`single_task`")
        draw(point, err, fmt="*", ms=14, color="black", zorder=5, label="single-task")
    method_colours = {name: colours(index % 10) for index, name in enumerate(methods)}
    for label, (x, y) in (references or {}).items():
        # A reference named after a method ("paper equal") takes that method's colour.
        method = next((m for m in methods if label == m or label.endswith(" " + m)), None)
        ax.scatter(
            [x],
            [y],
            marker="s",
            s=40,
            facecolors="none",
            zorder=3,
            edgecolors=method_colours.get(method, "black"),
            label=label,
        )
    ax.set_xlabel(f"{tasks[0]} {metric}")
    ax.set_ylabel(f"{tasks[1]} {metric}")
    ax.set_title("trade-off between the two tasks")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    if own_figure:
        fig.tight_layout()
    return fig


__all__ = ["plot_affinity", "plot_history", "plot_pairwise_over_time", "plot_task_weights", "plot_tradeoff"]
