"""Callbacks kmtl adds to training, and resumable training.

`TrainingGuard` stops on a non-finite batch (every `MultiTaskModel.fit` adds
it). `BackupAndRestore` checkpoints everything training changes and
`fit_resumable` restarts `fit` exactly where a killed run stopped.
"""

from __future__ import annotations

import json
import os
import time
import zipfile

import keras
import numpy as np

from kmtl import _atomic
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


# --- resumable training --------------------------------------------------------------
#: The checkpoint's file name inside a `BackupAndRestore` directory.
CHECKPOINT_FILE = "checkpoint.npz"
_CHECKPOINT_FORMAT = 1


def _unique(variables):
    seen, kept = set(), []
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            kept.append(variable)
    return kept


def _training_variables(model):
    """Every variable a training step changes: the model's (layers, strategy, seed states), the optimizer's."""
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    return _unique(list(model.variables) + (list(optimizer.variables) if optimizer is not None else []))


def _metric_variables(model):
    """The running means of the epoch: kmtl's objective trackers and Keras's compiled metrics."""
    variables = []
    objective = getattr(model, "objective", None)
    if objective is not None:
        for tracker in objective.metrics(training=True):
            variables += list(tracker.variables)
    for metric in model.metrics:
        variables += list(metric.variables)
    return _unique(variables)


class BackupAndRestore(keras.callbacks.Callback):
    """Checkpoints everything training changes, so a killed run resumes exactly.

    A checkpoint is one file, `<directory>/checkpoint.npz`, holding the value of
    every variable a training step changes — the model's weights (and the
    state of its dropout seed generators), the weighting strategy's state
    (uncertainty log-variances, DWA loss history, GradNorm and FAMO weights,
    the draw counters of RLW, PCGrad, GradDrop and GradVac), the optimizer's
    slots and `iterations` — the running sums of the epoch's metrics, and a
    JSON record: the position (`epoch`, and `step`, the batches of that epoch
    already trained), the history of the finished epochs and a `fingerprint`.
    It is written to a temporary file in the same directory, flushed and moved
    over the previous one (`os.replace`), so a kill during a save leaves the
    previous checkpoint whole; stray temporary files are ignored.

    When: at the start of every epoch after the first (after the strategy's
    `on_epoch_end`) and at the end of training; mid-epoch after every
    `save_every_steps` batches and when `save_every_seconds` have passed since
    the last save (never after the last batch of an epoch: the epoch-boundary
    checkpoint follows).

    Restoring: at the start of training, if the directory holds a checkpoint,
    its variables are assigned (the metric sums at the start of the resumed
    epoch, after Keras resets them). The position is then `position()`; the
    caller must start `fit` there: `fit_resumable` does, by training the rest
    of the interrupted epoch (`steps_per_epoch - step` batches, from a dataset
    that skips the consumed ones) and then the remaining epochs. With it and a
    dataset whose order is a function of the epoch (`kmtl.data.task_dataset`
    with `epochs=`), a run killed at any point and restarted ends where an
    uninterrupted run ends, up to float rounding. With `model.fit` and an
    arbitrary dataset, pass `initial_epoch=backup.position()[0]` yourself and
    leave mid-epoch saves off: you get every variable of the last finished
    epoch back, and the data order is whatever your dataset does on its
    first iteration.

    A checkpoint whose `fingerprint` differs from this callback's (another
    config), or that cannot be read, is refused: `position()` and training
    raise `ValueError` naming the file; call `clear()` (`kmtl train
    --no-resume`) to start over. Restoring into a model with other variables
    (count, shapes or dtypes) raises `ValueError` and assigns nothing.

    Args:
        directory: where the checkpoint lives (created on the first save).
        save_every_steps: also save after every this many batches of an
            epoch; `None`: only by time and at epoch boundaries.
        save_every_seconds: also save mid-epoch once this many seconds have
            passed since the last save; `None`: never by time.
        fingerprint: a string identifying what is trained (e.g. a config
            hash); a checkpoint with another one is refused.

    Example:

    >>> backup = kmtl.callbacks.BackupAndRestore("saved_models/run/checkpoint", save_every_steps=100)
    >>> history = kmtl.callbacks.fit_resumable(model, make_dataset, epochs=5,
    ...                                        steps_per_epoch=n, backup=backup)  # doctest: +SKIP
    """

    def __init__(self, directory, save_every_steps=None, save_every_seconds=None, fingerprint=None):
        super().__init__()
        for name, value in (
            ("save_every_steps", save_every_steps),
            ("save_every_seconds", save_every_seconds),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
            ):
                raise ValueError(f"`{name}` must be a positive number or None. Received: {name}={value!r}")
        self.directory = os.fspath(directory)
        self.save_every_steps = None if save_every_steps is None else int(save_every_steps)
        self.save_every_seconds = save_every_seconds
        self.fingerprint = None if fingerprint is None else str(fingerprint)
        self.history: dict = {}
        self._pending = None  # the restored arrays, until assigned
        self._position = (0, 0)
        self._offset = 0
        self._epoch = 0
        self._step = 0
        self._epoch_ended = False
        self._last_save = time.monotonic()
        self._read = False

    @property
    def path(self) -> str:
        """`<directory>/checkpoint.npz`."""
        return os.path.join(self.directory, CHECKPOINT_FILE)

    # --- reading ------------------------------------------------------------
    def _load(self):
        if self._read:
            return
        self._read = True
        if not os.path.isfile(self.path):
            return
        try:
            if not zipfile.is_zipfile(self.path):
                raise ValueError("not an .npz archive")
            with np.load(self.path, allow_pickle=False) as stored:
                record = json.loads(str(stored["record"]))
                training = [stored[f"t{i}"] for i in range(record["num_training"])]
                metrics = [stored[f"m{i}"] for i in range(record["num_metrics"])]
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
            self._read = False
            raise ValueError(
                f"The checkpoint {self.path} cannot be read ({type(error).__name__}: {error}); delete it or "
                f"start over (`kmtl train --no-resume`, `resume=False`). Received: {self.path}"
            ) from None
        if (
            record.get("kmtl_checkpoint") != _CHECKPOINT_FORMAT
            or record.get("fingerprint") != self.fingerprint
        ):
            self._read = False
            raise ValueError(
                f"The checkpoint {self.path} belongs to another run (fingerprint {record.get('fingerprint')!r}, "
                f"this run {self.fingerprint!r}); delete it or start over (`kmtl train --no-resume`, "
                f"`resume=False`). Received: {self.path}"
            )
        self._pending = (training, metrics, record.get("training_paths"))
        self._position = (int(record["epoch"]), int(record["step"]))
        self.history = {key: list(values) for key, values in record["history"].items()}

    def position(self) -> tuple[int, int]:
        """`(epoch, step)` of the checkpoint (`(0, 0)` without one): where training continues.

        Raises:
            ValueError: for an unreadable checkpoint or one of another fingerprint.
        """
        self._load()
        return self._position

    def clear(self) -> None:
        """Deletes the checkpoint (and stray temporary files); the next training starts over."""
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name == CHECKPOINT_FILE or (
                    name.startswith(f".{CHECKPOINT_FILE}.") and name.endswith(".tmp")
                ):
                    os.remove(os.path.join(self.directory, name))
            if not os.listdir(self.directory):
                os.rmdir(self.directory)
        self._pending, self._position, self.history, self._read = None, (0, 0), {}, True

    @staticmethod
    def _assign(variables, arrays, what, path, stored_paths=None):
        paths = [v.path for v in variables]
        if stored_paths is not None and paths != stored_paths and sorted(paths) == sorted(stored_paths):
            if len(set(paths)) == len(paths):  # the same variables in another order: match them by path
                by_path = dict(zip(stored_paths, arrays))
                arrays = [by_path[p] for p in paths]
        if len(variables) != len(arrays) or any(
            tuple(v.shape) != a.shape or np.dtype(v.dtype) != a.dtype for v, a in zip(variables, arrays)
        ):
            have = [(tuple(v.shape), str(v.dtype)) for v in variables]
            stored = [(a.shape, str(a.dtype)) for a in arrays]
            raise ValueError(
                f"The checkpoint {path} does not fit this model: its {what} variables differ in number, shape "
                f"or dtype. Model: {have}. Received: {stored}"
            )
        for variable, array in zip(variables, arrays):
            variable.assign(array)

    # --- saving -------------------------------------------------------------
    def save(self) -> str:
        """Writes a checkpoint of the current position now; returns its path."""
        training = [keras.ops.convert_to_numpy(v) for v in _training_variables(self.model)]
        metrics = [keras.ops.convert_to_numpy(v) for v in _metric_variables(self.model)]
        record = {
            "kmtl_checkpoint": _CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "epoch": self._epoch,
            "step": self._step,
            "history": self.history,
            "num_training": len(training),
            "num_metrics": len(metrics),
            "training_paths": [v.path for v in _training_variables(self.model)],
        }
        arrays = {f"t{i}": a for i, a in enumerate(training)}
        arrays.update({f"m{i}": a for i, a in enumerate(metrics)})
        arrays["record"] = np.array(json.dumps(record, default=float))
        _atomic.replace_file(self.path, lambda f: np.savez(f, **arrays), binary=True)
        self._last_save = time.monotonic()
        self._position = (self._epoch, self._step)
        return self.path

    # --- hooks --------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._load()
        # Builds the optimizer now if the step has not: its slots then come in the order of the
        # model's trainable variables in every run, the interrupted one and the resumed one.
        variables = _training_variables(self.model)
        if self._pending is not None:
            self._assign(variables, self._pending[0], "training", self.path, self._pending[2])
        self._epoch_ended = False
        self._last_save = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        if self._epoch_ended:  # the previous epoch is over, strategy epoch hooks included
            self._epoch, self._step = epoch, 0
            self.save()
        self._epoch, self._offset = epoch, 0
        if self._pending is not None:
            resumed_epoch, step = self._position
            if epoch == resumed_epoch and step > 0:
                self._assign(_metric_variables(self.model), self._pending[1], "metric", self.path)
                self._offset = step
            self._pending = None
        self._step = self._offset
        self._epoch_ended = False

    def on_train_batch_end(self, batch, logs=None):
        self._step = self._offset + batch + 1
        if batch + 1 == (self.params or {}).get("steps"):
            return  # the epoch's last batch: the epoch-boundary checkpoint follows
        by_steps = self.save_every_steps is not None and self._step % self.save_every_steps == 0
        by_time = (
            self.save_every_seconds is not None
            and time.monotonic() - self._last_save >= self.save_every_seconds
        )
        if by_steps or by_time:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self._epoch_ended = True

    def on_train_end(self, logs=None):
        if self._epoch_ended:
            self._epoch, self._step = self._epoch + 1, 0
            self.save()
            self._epoch_ended = False


def fit_resumable(
    model,
    make_dataset,
    epochs: int,
    steps_per_epoch: int,
    backup: BackupAndRestore,
    callbacks=None,
    **fit_kwargs,
) -> dict:
    """Trains with `model.fit` from `backup`'s checkpoint (if any) to `epochs`; returns the full history.

    Restarting the same call after a kill continues from the last checkpoint:
    the rest of the interrupted epoch (`steps_per_epoch - step` batches of
    `make_dataset(epoch, step)`), then the remaining epochs
    (`make_dataset(epoch + 1, 0)`), with `initial_epoch` so that logs and
    callbacks count epochs as an uninterrupted run. `make_dataset(first,
    skip)` must return the batches of epochs `first, ..., epochs - 1` in one
    stream, skipping the first `skip` batches of epoch `first`, each epoch's
    batches a function of the epoch alone — e.g.
    `lambda first, skip: kmtl.data.task_dataset(..., epochs=(first, E), skip_batches=skip)`.

    Args:
        model: a compiled model.
        make_dataset: `(first_epoch, skip_batches) -> dataset`, as above.
        epochs: the total number of epochs.
        steps_per_epoch: batches in one epoch.
        backup: the `BackupAndRestore` that saves and restores (added last to
            the callbacks, after a `TrainingGuard` so that the strategy's
            epoch hook runs before an epoch-boundary save).
        callbacks: more callbacks.
        **fit_kwargs: passed to `model.fit` (e.g. `validation_data`, `verbose`).

    Returns:
        `{key: [one value per epoch]}` for every epoch, restored ones included.

    Raises:
        ValueError: for a non-positive `epochs` or `steps_per_epoch`, and as
            `BackupAndRestore` for a refused checkpoint.
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    if not isinstance(backup, BackupAndRestore):
        raise ValueError(
            f"`backup` must be a kmtl.callbacks.BackupAndRestore. Received: backup of type {type(backup).__name__}"
        )
    epoch, step = backup.position()
    callbacks = [TrainingGuard(), *(callbacks or []), backup]
    if step >= steps_per_epoch:  # cannot happen with BackupAndRestore's saves; be safe
        epoch, step = epoch + 1, 0
    if step > 0 and epoch < epochs:
        # Keras builds its compiled metrics on their first update: one batch of evaluation builds
        # them (changing no training state), so that the interrupted epoch's sums can be restored.
        model.evaluate(make_dataset(epoch, step).take(1), verbose=0)
        model.fit(
            make_dataset(epoch, step),
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=steps_per_epoch - step,
            callbacks=callbacks,
            **fit_kwargs,
        )
        epoch += 1
        if model.stop_training:
            return backup.history
    if epoch < epochs:
        model.fit(
            make_dataset(epoch, 0),
            initial_epoch=epoch,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            **fit_kwargs,
        )
    elif backup.model is None:  # nothing left to train: restore the variables all the same
        backup.set_model(model)
        backup.on_train_begin()
    return backup.history


__all__ = ["CHECKPOINT_FILE", "BackupAndRestore", "TrainingGuard", "fit_resumable"]
