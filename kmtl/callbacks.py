"""Callbacks kmtl adds to training."""

from __future__ import annotations

import keras

from kmtl.errors import NonFiniteLossError

_WHAT = {
    1: "a non-finite loss",
    2: "a non-finite gradient",
    3: "a non-finite combined update (task weights or gradients)",
}


@keras.saving.register_keras_serializable(package="kmtl")
class TrainingGuard(keras.callbacks.Callback):
    """Stops training on a non-finite batch, and drives the strategy's epoch hook.

    `MultiTaskModel.fit` adds it automatically. The train step rejects a
    batch whose losses, per-task gradients, task weights or update are not
    all finite: it changes nothing (weights, optimizer slots and iterations,
    strategy state) and records what failed in `model.objective.status`.
    After each batch the guard reads that record and raises
    `kmtl.NonFiniteLossError` naming the task. At the end of each epoch it
    calls the weighting strategy's `on_epoch_end`.
    """

    def on_train_begin(self, logs=None):
        objective = getattr(self.model, "objective", None)
        if objective is not None:
            objective.reset_status()

    def on_train_batch_end(self, batch, logs=None):
        objective = getattr(self.model, "objective", None)
        failure = objective.failure() if objective is not None else None
        if failure is None:
            return
        kind, task = failure
        self.model.stop_training = True
        culprit = f"Task {task!r}" if task is not None else "The combination of the tasks"
        raise NonFiniteLossError(
            f"{culprit} produced {_WHAT.get(kind, 'a non-finite value')} at batch {batch} (or earlier in the "
            "same execution block). That batch changed nothing: the model weights, the optimizer state and "
            "iterations and the weighting strategy's state are as before it. Check the task's labels and "
            "outputs (e.g. regression targets with NaN) or lower the learning rate. "
            f"Received: failure kind {kind} for task {task!r}",
            task=task,
        )

    def get_config(self):
        return {}

    def on_epoch_end(self, epoch, logs=None):
        strategy = getattr(self.model, "weighting", None)
        if strategy is not None:
            strategy.on_epoch_end(epoch)
