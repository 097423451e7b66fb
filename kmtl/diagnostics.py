"""Gradient-conflict diagnostics: how much the tasks' gradients disagree.

For the shared variables of a `kmtl.MultiTaskModel`, the cosine similarity
between two tasks' loss gradients is negative when the tasks conflict (one
task's step increases the other's loss to first order). PCGrad, CAGrad,
MGDA and the other gradient-level strategies exist for that case.

Example:

>>> conflicts = kmtl.diagnostics.gradient_cosines(model, test.take(4))   # doctest: +SKIP
>>> conflicts[("digit", "parity")]                                          # doctest: +SKIP
-0.12
"""

from __future__ import annotations

import itertools

import keras
import numpy as np


def gradient_cosines(model, dataset, steps: int | None = None) -> dict:
    """Pairwise cosine similarity of the tasks' shared-parameter gradients.

    The gradients are summed over the batches of `dataset` (so the cosine is
    that of the full-data gradients, not an average of per-batch cosines).

    Args:
        model: a compiled `kmtl.MultiTaskModel`.
        dataset: a `tf.data.Dataset` yielding `(x, {task: y})` or
            `(x, {task: y}, {task: weight})`.
        steps: number of batches (default: the whole dataset).

    Returns:
        `{(task_a, task_b): cosine}` for every pair `a < b` in head order;
        a pair where either gradient is zero gets `nan`.

    Raises:
        ValueError: if the model is not a compiled `MultiTaskModel` with at
            least two trained tasks.
    """
    from kmtl import backend
    from kmtl.model import MultiTaskModel

    if not isinstance(model, MultiTaskModel) or not model.compiled:
        raise ValueError(
            f"gradient_cosines needs a compiled kmtl.MultiTaskModel. Received: {type(model).__name__}"
        )
    total, names = None, None
    for i, batch in enumerate(dataset):
        if steps is not None and i >= steps:
            break
        part = np.asarray(backend.shared_task_gradients(model, batch), dtype="float64")
        total = part if total is None else total + part
    if total is None:
        raise ValueError("gradient_cosines received an empty dataset.")
    names = model.objective.task_names
    if len(names) < 2:
        raise ValueError(f"gradient_cosines needs at least two trained tasks. Received: {names}")
    stacked = np.asarray(total, dtype="float64")
    gram = stacked @ stacked.T
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    result = {}
    for a, b in itertools.combinations(range(len(names)), 2):
        denominator = norms[a] * norms[b]
        result[(names[a], names[b])] = float(gram[a, b] / denominator) if denominator > 0 else float("nan")
    return result


@keras.saving.register_keras_serializable(package="kmtl")
class GradientConflictMonitor(keras.callbacks.Callback):
    """Logs the pairwise gradient cosines as `cos_<a>_<b>` at the end of epochs.

    Args:
        data: a small `tf.data.Dataset` (a few batches) to measure on.
        steps: batches of `data` to use (default: all).
        every: measure every `every` epochs.

    The values appear in the `History` (e.g. `history.history["cos_digit_parity"]`)
    and in the progress bar.
    """

    def __init__(self, data, steps: int | None = None, every: int = 1):
        super().__init__()
        if int(every) != every or every < 1:
            raise ValueError(f"`every` must be a positive integer. Received: every={every!r}")
        self.data = data
        self.steps = steps
        self.every = int(every)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        for (a, b), value in gradient_cosines(self.model, self.data, self.steps).items():
            logs[f"cos_{a}_{b}"] = value

    def get_config(self):
        return {"steps": self.steps, "every": self.every}


__all__ = ["GradientConflictMonitor", "gradient_cosines"]
