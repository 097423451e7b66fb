"""Training on several machines: `fit` under `tf.distribute.MultiWorkerMirroredStrategy`.

Keras 3's `Model.fit` does not run under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585, open). On Keras 3.15.1 with TensorFlow 2.21 a
two-worker `fit` stops before its first step: the trainer's symbolic build
(`keras/src/backend/tensorflow/trainer.py`, `_maybe_symbolic_build`) hands
the whole first per-replica batch to `strategy.reduce("MEAN", ...)`, and the
collective strategy's `reduce_to` cannot convert it (`ValueError: Attempt to
convert a value (PerReplica:{...}) with an unsupported type`).

`fit` here is a small training loop on public TensorFlow and Keras APIs that
runs the model's own `train_step` under `strategy.run`, so a
`kmtl.MultiTaskModel` trains with its weighting strategy exactly as under
`MirroredStrategy`: kmtl's step sums its per-task quantities (task presence,
loss totals, per-task gradients, Gram matrices, finiteness flags) over all
replicas of all workers, and the optimizer all-reduces the update.

* **Data**: `dataset_fn(input_context)` builds each worker's pipeline
  (`strategy.distribute_datasets_from_function`): shard it with
  `input_context.num_input_pipelines` / `input_pipeline_id` and batch it at
  `input_context.get_per_replica_batch_size(global_batch_size)`.
* **Checkpoints**: at the end of every epoch every worker saves (the save
  may run collectives); the chief writes to `checkpoint_dir`, the others to
  a temporary directory that is deleted at once. A checkpoint holds the
  model's weights, the optimizer (slots and `iterations`), the weighting
  strategy's state, the epoch counter and the history so far.
* **Resume**: started again with the same command and `checkpoint_dir`,
  `fit` restores the latest checkpoint on every worker, checks that all
  workers restored the same epoch, skips the batches already trained on and
  continues; the history it returns covers every epoch.

Example (one worker's program; `TF_CONFIG` describes the cluster):

>>> import tensorflow as tf
>>> strategy = tf.distribute.MultiWorkerMirroredStrategy()   # first, before other TF ops
>>> import kmtl
>>> with strategy.scope():
...     model = kmtl.build_model(heads=[kmtl.heads.Classification("digit", 10), kmtl.heads.Binary("parity")],
...                              trunk=kmtl.trunks.dense((32,)), input_shape=(8, 8, 1))
...     model.compile(optimizer="adam", weighting="pcgrad")
>>> def dataset_fn(context):   # unbatched examples -> this worker's shard, per-replica batches
...     dataset = examples.shard(context.num_input_pipelines, context.input_pipeline_id)
...     return dataset.batch(context.get_per_replica_batch_size(64), drop_remainder=True).repeat()
>>> history = kmtl.distributed.fit(model, dataset_fn, epochs=3, steps_per_epoch=100,
...                                checkpoint_dir="/shared/run1")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Sequence

import keras
import tensorflow as tf

from kmtl import backend
from kmtl.callbacks import TrainingGuard


class _Progress(tf.train.experimental.PythonState):
    """Epochs done, batches consumed per worker and the history: saved with the weights."""

    def __init__(self):
        self.epoch = 0
        self.batches = 0
        self.history: dict[str, list[float]] = {}

    def serialize(self):
        return json.dumps({"epoch": self.epoch, "batches": self.batches, "history": self.history})

    def deserialize(self, string_value):
        state = json.loads(string_value.decode() if isinstance(string_value, bytes) else string_value)
        self.epoch, self.batches, self.history = state["epoch"], state["batches"], state["history"]


def is_chief(strategy=None) -> bool:
    """Whether this process writes the checkpoints of `strategy` (the current one by default).

    True for a single process and, in a cluster, for the task `TF_CONFIG`
    names `chief` (or worker 0 if there is no chief).
    """
    strategy = strategy or tf.distribute.get_strategy()
    return bool(strategy.extended.should_checkpoint)


def _check_arguments(model, dataset_fn, epochs, steps_per_epoch, verbose, max_to_keep):
    if not isinstance(model, keras.Model) or not getattr(model, "compiled", False):
        raise ValueError(
            "`model` must be a compiled Keras model (a kmtl.MultiTaskModel compiled inside "
            f"`strategy.scope()`). Received: model={model!r}"
        )
    if getattr(model, "objective", None) is None:
        raise ValueError(
            "`model` must be a compiled kmtl.MultiTaskModel (its train step sums the per-task "
            f"quantities over workers). Received: model of type {type(model).__name__}"
        )
    if not callable(dataset_fn):
        raise TypeError(
            "`dataset_fn` must be a function of a `tf.distribute.InputContext` returning a "
            f"`tf.data.Dataset` batched per replica. Received: dataset_fn={dataset_fn!r}"
        )
    for name, value in (
        ("epochs", epochs),
        ("steps_per_epoch", steps_per_epoch),
        ("max_to_keep", max_to_keep),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    if verbose not in ("auto", 0, 1, 2):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2. Received: verbose={verbose!r}")


def _cluster_size() -> int:
    """Number of tasks `TF_CONFIG` describes (0 if unset or unreadable: TensorFlow reports that)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster") or {}
        return sum(len(tasks) for tasks in cluster.values())
    except (AttributeError, TypeError, ValueError):
        return 0


def _check_scope(model, strategy):
    """Raises unless the model, its optimizer and its strategy's state were created in `strategy.scope()`."""
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        raise ValueError(
            "kmtl.distributed.fit runs synchronous data-parallel training (MultiWorkerMirroredStrategy); "
            "parameter-server training is not supported. Received: ParameterServerStrategy"
        )
    tasks = _cluster_size()
    if tasks > 1 and getattr(strategy, "cluster_resolver", None) is None:
        # Outside any scope each worker would train alone on its shard, silently.
        raise ValueError(
            f"TF_CONFIG describes a cluster of {tasks} tasks, but the model was not built in the scope of a "
            "multi-worker strategy: create `tf.distribute.MultiWorkerMirroredStrategy()` at program start and "
            "build and compile the model inside `with strategy.scope():`. "
            f"Received: a model of strategy {type(strategy).__name__}"
        )
    owners = [("model", model.weights), ("optimizer", [model.optimizer.iterations])]
    if model.weighting is not None:
        owners.append(("weighting strategy", model.weighting.weights))
    for what, variables in owners:
        for variable in variables:
            if not strategy.extended.variable_created_in_scope(variable.value):
                raise ValueError(
                    f"The {what} was created outside the scope of the strategy that trains it. Build and "
                    "compile the model inside `with strategy.scope():` (the strategy created at program "
                    f"start). Received: variable {variable.path!r} not created under {type(strategy).__name__}"
                )


def _dataset_fn(dataset_fn, skip):
    def make(context):
        dataset = dataset_fn(context)
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(
                "`dataset_fn` must return a `tf.data.Dataset` (batched per replica). "
                f"Received: {type(dataset).__name__}"
            )
        return dataset.skip(skip) if skip else dataset

    return make


def _build(model, strategy, sample):
    """Creates the optimizer slots and the metric state before the first step (no training)."""
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        local = keras.tree.map_structure(lambda v: strategy.experimental_local_results(v)[0], sample)
        backend.test_step(model, local)
        model.reset_metrics()


def _agreed(strategy, value: int) -> list[int]:
    """`value` of every replica of every worker (a collective: every worker must call it)."""

    @tf.function
    def gather():
        per_replica = strategy.run(lambda: tf.constant([value], tf.int64))
        return strategy.gather(per_replica, axis=0)

    return [int(v) for v in gather().numpy()]


class _Checkpoints:
    """The chief's `CheckpointManager` on `directory`; other workers save to a deleted temporary dir."""

    def __init__(self, checkpoint, directory, chief, max_to_keep):
        self.checkpoint, self.directory, self.chief = checkpoint, directory, chief
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep) if chief else None

    def restore(self) -> bool:
        latest = tf.train.latest_checkpoint(self.directory)
        if latest is None:
            return False
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ValueError(
                f"The checkpoint {latest!r} does not fit this model, optimizer and weighting strategy (another "
                "run's `checkpoint_dir`?): resume with the same model and compile arguments, or use a new "
                f"directory. Received: {type(error).__name__}: {str(error)[:500]}"
            ) from None
        return True

    def save(self, number):
        if self.chief:
            self.manager.save(checkpoint_number=number)
            return
        scratch = tempfile.mkdtemp(prefix="kmtl-worker-checkpoint-")
        try:
            tf.train.CheckpointManager(self.checkpoint, scratch, 1).save(checkpoint_number=number)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def fit(
    model: keras.Model,
    dataset_fn: Callable,
    *,
    epochs: int,
    steps_per_epoch: int,
    checkpoint_dir: str | None = None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    verbose="auto",
    max_to_keep: int = 2,
) -> keras.callbacks.History:
    """Trains a compiled `kmtl.MultiTaskModel` under the strategy it was built in.

    Made for `tf.distribute.MultiWorkerMirroredStrategy` (where Keras's
    `fit` fails, see the module docstring); it runs under any strategy,
    including none (one process), with the same results for the same global
    batches. Every worker runs the same program with its own `TF_CONFIG`.

    Args:
        model: a `kmtl.MultiTaskModel` built and compiled inside
            `strategy.scope()` (the strategy created at program start, before
            any other TensorFlow op).
        dataset_fn: `dataset_fn(input_context) -> tf.data.Dataset` yielding
            `(x, {task: y})` or `(x, {task: y}, {task: sample_weight})` batched
            per replica, repeated (`.repeat()`): training reads
            `epochs * steps_per_epoch` batches from it. Each worker calls it
            once with its `tf.distribute.InputContext`; shard with
            `dataset.shard(context.num_input_pipelines, context.input_pipeline_id)`
            and batch with `context.get_per_replica_batch_size(global_batch)`.
            It must give the same sequence on every run for a resumed run
            to see the batches an uninterrupted one would (fixed shuffle seeds).
        epochs: the total number of epochs, counting those already done in
            `checkpoint_dir`.
        steps_per_epoch: batches (global steps) per epoch.
        checkpoint_dir: where the chief saves a checkpoint after each epoch
            and whence every worker resumes; on storage every worker can read
            (a shared file system or a bucket). None: no checkpoints.
        callbacks: Keras callbacks, run on every worker with `fit`'s hooks
            (train/epoch/batch begin and end) and identical logs. A callback
            that stops training (`model.stop_training = True`) must decide the
            same on every worker, as a decision from the logs does.
            `kmtl.TrainingGuard` is added if missing.
        verbose: 0 silent, 1 progress bar, 2 one line per epoch, "auto" = 1;
            only the chief prints.
        max_to_keep: how many checkpoints the chief keeps.

    Returns:
        A `keras.callbacks.History` whose `history` maps `loss`, each
        `<task>_loss`, `<task>_weight` and each `<task>_<metric>` to one value
        per epoch (all epochs, also those of an earlier, interrupted run).

    Raises:
        ValueError: for an uncompiled or non-kmtl model, a model, optimizer or
            strategy state created outside the strategy's scope, non-positive
            `epochs` / `steps_per_epoch`, a dataset that ran out, or workers
            that restored different checkpoints (a `checkpoint_dir` that is
            not shared), or a checkpoint in `checkpoint_dir` that does not fit
            the model.
        TypeError: if `dataset_fn` is not callable or returns no `tf.data.Dataset`.
        kmtl.NonFiniteLossError: on a non-finite batch (which changed nothing;
            the last checkpoint is the end of the previous epoch).
    """
    _check_arguments(model, dataset_fn, epochs, steps_per_epoch, verbose, max_to_keep)
    strategy = model.distribute_strategy
    _check_scope(model, strategy)
    chief = is_chief(strategy)
    verbose = 1 if verbose == "auto" else verbose

    progress = _Progress()
    items = {"model": model, "optimizer": model.optimizer, "progress": progress}
    if model.weighting is not None:
        items["weighting"] = model.weighting
    checkpoint = tf.train.Checkpoint(**items)
    checkpoints = (
        None if checkpoint_dir is None else _Checkpoints(checkpoint, checkpoint_dir, chief, max_to_keep)
    )

    with backend.translate_errors(model):
        build_data = strategy.distribute_datasets_from_function(_dataset_fn(dataset_fn, 0))
        _build(model, strategy, next(iter(build_data)))
        if checkpoints is not None:
            checkpoints.restore()
            epochs_done = _agreed(strategy, progress.epoch)
            if len(set(epochs_done)) != 1:
                raise ValueError(
                    f"The workers restored different epochs from {checkpoint_dir!r}: every worker must read "
                    "the chief's checkpoints, so `checkpoint_dir` must be on storage shared by all workers. "
                    f"Received: epochs done per replica {epochs_done}"
                )
        history = _train(
            model,
            strategy,
            dataset_fn,
            progress,
            checkpoints,
            epochs,
            steps_per_epoch,
            callbacks,
            verbose,
            chief,
        )
    return history


def _train(
    model, strategy, dataset_fn, progress, checkpoints, epochs, steps_per_epoch, callbacks, verbose, chief
):
    callbacks = list(callbacks or [])
    if not any(isinstance(c, TrainingGuard) for c in callbacks):
        callbacks.append(TrainingGuard())
    callback_list = keras.callbacks.CallbackList(
        callbacks,
        add_history=False,
        add_progbar=chief and verbose != 0,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
    )
    dataset = strategy.distribute_datasets_from_function(_dataset_fn(dataset_fn, progress.batches))
    iterator = iter(dataset)

    @tf.function
    def train_function(iterator):
        outputs = strategy.run(model.train_step, args=(next(iterator),))
        logs = {name: strategy.experimental_local_results(v)[0] for name, v in outputs.items()}
        # Keras keeps metric state per replica (on-read variables): read here,
        # in cross-replica context, it is summed over every replica of every worker.
        logs.update(model.get_metrics_result())
        return logs

    model.stop_training = False
    logs = {}
    callback_list.on_train_begin()
    for epoch in range(progress.epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        for batch in range(steps_per_epoch):
            callback_list.on_train_batch_begin(batch)
            try:
                outputs = train_function(iterator)
            except tf.errors.OutOfRangeError:
                raise ValueError(
                    f"The dataset of `dataset_fn` ran out at epoch {epoch + 1}, batch {batch + 1}: training reads "
                    f"epochs * steps_per_epoch = {epochs * steps_per_epoch} batches per worker. Repeat it "
                    f"(`.repeat()`). Received: steps_per_epoch={steps_per_epoch}, epochs={epochs}"
                ) from None
            logs = {name: float(value) for name, value in outputs.items()}
            callback_list.on_train_batch_end(batch, logs)
        for name, value in logs.items():
            progress.history.setdefault(name, []).append(value)
        callback_list.on_epoch_end(epoch, logs)
        progress.epoch, progress.batches = epoch + 1, progress.batches + steps_per_epoch
        if checkpoints is not None:
            checkpoints.save(progress.epoch)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    history = keras.callbacks.History()
    history.set_model(model)
    history.params = {"verbose": verbose, "epochs": epochs, "steps": steps_per_epoch}
    history.epoch = list(range(len(next(iter(progress.history.values()), []))))
    history.history = {name: list(values) for name, values in progress.history.items()}
    return history


__all__ = ["fit", "is_chief"]
