"""Callbacks kmtl adds to training."""

from __future__ import annotations

import math

import keras


@keras.saving.register_keras_serializable(package="kmtl")
class TrainingGuard(keras.callbacks.Callback):
    """Stops training on a non-finite task loss and drives strategy hooks.

    `MultiTaskModel.fit` adds it automatically. After each batch it reads the
    per-task running losses (`<task>_loss`); if one is NaN or infinite it
    raises `kmtl.NonFiniteLossError` naming the task. The train step zeroes
    the gradients of a non-finite batch, so the weights stay finite. At the
    end of each epoch it calls the weighting strategy's `on_epoch_end`.
    """

    def on_train_batch_end(self, batch, logs=None):
        if not logs:
            return
        from kmtl.model import NonFiniteLossError

        names = getattr(self.model, "task_names", [])
        keys = [f"{n}_loss" for n in names if f"{n}_loss" in logs] or ["loss"]
        for key in keys:
            value = float(logs[key])
            if not math.isfinite(value):
                task = key[: -len("_loss")] if key != "loss" else (names[0] if len(names) == 1 else "all")
                self.model.stop_training = True
                raise NonFiniteLossError(
                    f"Task {task!r} produced a non-finite training loss ({value}) at "
                    f"batch {batch}. The update of that batch was not applied. Check the "
                    "task's labels and outputs (e.g. regression targets with NaN, or a "
                    f"learning rate that is too high). Received: {key}={value}"
                )

    def get_config(self):
        return {}

    def on_epoch_end(self, epoch, logs=None):
        strategy = getattr(self.model, "weighting", None)
        if strategy is not None:
            strategy.on_epoch_end(epoch)
