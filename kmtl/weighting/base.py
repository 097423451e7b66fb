"""The contract shared by every weighting strategy.

A weighting strategy decides how the per-task losses of a multi-task model
become one parameter update. There are two families, both subclasses of
`Weighting` (a `keras.layers.Layer`, so that its state lives in Keras
variables, is saved in `.keras` files and checkpoints, and serializes):

* **Loss-level** strategies (`level == "loss"`) turn the vector of per-task
  losses into one scalar in `combine`. The model then takes one ordinary
  gradient of that scalar. Trainable state (e.g. the log-variances of
  uncertainty weighting) is trained by the model's optimizer with the rest of
  the model.
* **Gradient-level** strategies (`level == "gradient"`) receive, for every
  shared variable, the stacked per-task gradients (shape `[T, *var.shape]`)
  and return the combined gradient for each variable (`combine_gradients`).
  Task-specific variables (heads) always get their own task's gradient; the
  model does that part. Most methods only need the `T x T` Gram matrix of the
  task gradients: they implement `weights_from_gram` and inherit
  `combine_gradients`, which computes the Gram matrix variable by variable
  (no concatenation of all parameters) and returns `sum_t alpha_t g_t`.

Every strategy also records the task weights it used last in the
non-trainable variable `task_weights` (shape `[T]`); the model logs them as
`weight_<task>` in the history.

Masks: `present` is a `[T]` boolean tensor, `False` for a task that has no
labelled example in the batch. Such a task's loss is 0 and its gradient is
zero. Strategies must give it weight 0 and must not let it change their
state (loss histories, EMA targets, learned weights).

Tensors passed in are TensorFlow tensors inside a `tf.function`; the math
should use `keras.ops` where it can, and must be graph-safe (no Python
branching on tensor values) and free of host round-trips.

Distribution: under `tf.distribute.MirroredStrategy` every replica runs the
strategy. Gradient-level strategies receive gradients that are already
summed over replicas, so every replica computes the same weights. Loss-level
strategies receive the replica's own (differentiable) per-task losses, with
the distribution scaling already undone; state that is updated from loss
values must be updated from `self.synced(ops.stop_gradient(losses))` (the
mean over replicas) so that every replica keeps the same state. Create state
with `self.add_state(...)`, which makes variables that replicas may assign.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kmtl")
class Weighting(keras.layers.Layer):
    """Base class of kmtl's weighting strategies.

    Subclasses set the class attribute `level` to `"loss"` or `"gradient"`,
    validate and store their constructor arguments, create their state in
    `build_state` with `self.add_weight(...)`, and implement `combine`
    (loss level) or `weights_from_gram` / `combine_gradients` (gradient
    level). `get_config` must return every constructor argument.

    Args:
        update_every: gradient-level strategies only: recompute the task
            weights every `update_every` steps and reuse the last weights in
            between (the model then takes one ordinary backward pass of the
            weighted loss on the other steps). 1 recomputes every step.
        name: layer name.
    """

    level = "loss"
    #: Gradient-level strategies that work from the Gram matrix alone set
    #: this to True; the model may then use cheaper paths.
    gram_based = False
    #: Whether `combine_gradients` may be applied to gradients with respect to
    #: the shared representation instead of the shared parameters.
    supports_representation = True
    #: Gradient level: where per-task gradients are taken by default.
    #: "parameters": w.r.t. the shared variables; "representation": w.r.t.
    #: the shared features (then one backward pass through the trunk).
    default_mode = "parameters"

    def __init__(self, update_every: int = 1, mode: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(update_every) != update_every or update_every < 1:
            raise ValueError(
                f"`update_every` must be a positive integer. Received: update_every={update_every}"
            )
        if mode is None:
            mode = self.default_mode
        if mode not in ("parameters", "representation"):
            raise ValueError(f"`mode` must be 'parameters' or 'representation'. Received: mode={mode!r}")
        if mode == "representation" and not self.supports_representation:
            raise ValueError(
                f"{type(self).__name__} cannot work on the shared representation. Received: mode={mode!r}"
            )
        self.update_every = int(update_every)
        self.mode = mode
        self.task_names: list[str] = []

    # --- state -------------------------------------------------------------
    def build(self, task_names: Sequence[str]):
        """Creates the state for these tasks (called by the model's compile).

        `task_names` is stored in the build config, so a reloaded model
        rebuilds the same state before its variables are restored.
        """
        task_names = list(task_names)
        if not task_names:
            raise ValueError("A weighting strategy needs at least one task.")
        self.task_names = task_names
        self.task_weights = self.add_state("task_weights", (len(task_names),), "ones")
        self.build_state(len(task_names))

    def add_state(self, name, shape, initializer="zeros", dtype="float32"):
        """Adds a non-trainable state variable that every replica may assign."""
        return self.add_weight(
            shape=shape,
            initializer=initializer,
            dtype=dtype,
            trainable=False,
            aggregation="only_first_replica",
            name=name,
        )

    def synced(self, x):
        """Mean of `x` over replicas (identity outside a multi-replica step).

        For state updates only: no gradient flows through it. The result is also recorded so that the training step can order this
        collective before the optimizer's own all-reduce.
        """
        import tensorflow as tf

        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return x
        # Not differentiable: the gradient of a collective is another collective.
        result = tf.stop_gradient(ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tf.stop_gradient(x)))
        self.__dict__.setdefault("_collective_outputs", []).append(result)
        return result

    def pop_collective_outputs(self) -> list:
        """Returns and forgets the outputs of `synced` since the last call."""
        return self.__dict__.pop("_collective_outputs", [])

    def build_state(self, num_tasks: int) -> None:
        """Creates strategy-specific variables. Default: none."""

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    # --- loss level ----------------------------------------------------------
    def combine(self, losses, present, step):
        """Returns the scalar training loss from per-task losses.

        Args:
            losses: `[T]` float tensor of (unweighted) per-task losses.
            present: `[T]` bool tensor, False for tasks without labels.
            step: scalar int tensor, the optimizer iteration (0-based).
        """
        raise NotImplementedError(
            f"{type(self).__name__} is a {self.level}-level strategy and has no `combine`."
        )

    # --- gradient level ------------------------------------------------------
    def weights_from_gram(self, gram, losses, present, step):
        """Returns `[T]` weights `alpha` such that the update is `G^T alpha`.

        Args:
            gram: `[T, T]` Gram matrix `G G^T` of the task gradients.
            losses: `[T]` per-task losses (for methods that use them).
            present: `[T]` bool mask of tasks with labels in this batch.
            step: scalar int tensor, the optimizer iteration.
        """
        raise NotImplementedError

    def combine_gradients(self, grads, losses, present, step):
        """Combines stacked per-task gradients into one gradient per variable.

        Args:
            grads: list over shared variables (or representation tensors) of
                tensors of shape `[T, *shape]`.
            losses, present, step: as in `weights_from_gram`.

        Returns:
            A list of tensors of shape `shape`, one per entry of `grads`.
        """
        num_tasks = ops.shape(grads[0])[0]
        gram = None
        for g in grads:
            flat = ops.reshape(g, (num_tasks, -1))
            part = ops.matmul(flat, ops.transpose(flat))
            gram = part if gram is None else gram + part
        alpha = self.weights_from_gram(gram, losses, present, step)
        self.task_weights.assign(ops.cast(alpha, self.task_weights.dtype))
        return [ops.tensordot(ops.cast(alpha, g.dtype), g, axes=1) for g in grads]

    def aggregate(self, G):
        """Pure function form: `[T, D]` task gradients -> `[D]` update.

        Uses no labels mask (all tasks present) and step 0. Builds the state
        for `T` anonymous tasks if the strategy has not been built yet.
        """
        G = ops.convert_to_tensor(G)
        num_tasks = int(G.shape[0])
        if not self.built:
            self.build([f"task_{i}" for i in range(num_tasks)])
        present = ops.ones((num_tasks,), dtype="bool")
        losses = ops.ones((num_tasks,), dtype=G.dtype)
        step = ops.convert_to_tensor(0, dtype="int64")
        return self.combine_gradients([G], losses, present, step)[0]

    # --- hooks ---------------------------------------------------------------
    def on_epoch_end(self, epoch: int) -> None:
        """Called eagerly at the end of every training epoch (e.g. DWA)."""

    def get_config(self):
        config = super().get_config()
        config.update({"update_every": self.update_every, "mode": self.mode})
        return config
