"""Argument checks shared by the data modules (a leaf: it imports no other kmtl module)."""

from __future__ import annotations

import numpy as np


def check_batch_size(batch_size):
    """`batch_size` as an int, None (unbatched), or a ValueError."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer or None (unbatched). Received: batch_size={batch_size!r}"
        )
    return int(batch_size)


def check_task_names(tasks, available, where: str) -> list[str]:
    """`tasks` as a list, or a ValueError: not a non-empty list, unknown or repeated names.

    Args:
        tasks: a task name or a list/tuple of them.
        available: the known task names, in their order.
        where: how the message names the dataset, e.g. `"dataset 'mnist'"`.
    """
    available = list(available)
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks) if isinstance(tasks, (list, tuple)) else tasks
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(
            f"`tasks` must be a non-empty list of task names from {available}. Received: tasks={tasks!r}"
        )
    unknown = [task for task in tasks if task not in available]
    if unknown:
        raise ValueError(
            f"Unknown task(s) {unknown} for {where}; available tasks: {available}. Received: tasks={tasks!r}"
        )
    duplicates = sorted({task for task in tasks if tasks.count(task) > 1})
    if duplicates:
        raise ValueError(f"Duplicate task names {duplicates}; list each task once. Received: tasks={tasks!r}")
    return tasks
