"""The contract shared by every weighting strategy.

A weighting strategy decides how the per-task losses of a multi-task model
become one parameter update. It is a `keras.layers.Layer` (its state lives in
Keras variables, so it is saved in `.keras` files and checkpoints, and it
serializes), and its math is made of **pure functions**: they read the state
they are given and return the state they would leave, and never assign a
variable. The training step commits the new state only when the whole batch
was finite (`commit`), so a rejected batch leaves the strategy untouched,
and `aggregate(G)` can be called at any time without changing anything.

Two families:

* **Loss level** (`level == "loss"`): `combine` turns the per-task losses
  into one scalar. The model takes one gradient of it. The returned weights
  are the derivative of the scalar with respect to each task loss, so the
  update is `sum_t weights_t g_t` (and `aggregate(G)` is `G^T weights`).
  Trainable state (uncertainty's log-variances) is trained by the model's
  optimizer.
* **Gradient level** (`level == "gradient"`): from the per-task gradients of
  the shared variables (or of the shared representation) they return one
  update. Most only need the `T x T` Gram matrix `K = G G^T` and return
  weights `alpha` with update `G^T alpha` (`gram_based = True`, implement
  `weights_from_gram`); the others implement `combine_gradients` on the
  stacked gradients. Task-specific variables (heads) always get their own
  task's gradient; the step does that part.

Arguments of the pure functions:

* `losses`: `[T]` differentiable per-task losses of this replica (static
  `loss_weights` applied). Under `tf.distribute` they are the replica's share:
  their sum over replicas is the global batch's loss.
* `values`: `[T]` the same losses for the whole global batch, without
  gradient, identical on every replica. State updates and weights must be
  computed from `values` (never from `losses`), so that all replicas agree.
* `present`: `[T]` bool, False for a task without a labelled example in the
  global batch. Such a task must get weight 0 and must not change the state.
* `step`: scalar int64, the optimizer's iteration (0-based).
* `state`: `{name: tensor}`, the current value of every state variable
  (`self.state()`).

Math uses `keras.ops` (no TensorFlow import), is graph-safe (no Python
branching on tensor values, no host round-trips) and XLA-safe unless the
class sets `jit_safe = False`.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from kmtl.weighting import _checks

ENGINES = ("auto", "jacobian", "gram")


class Weighting(keras.layers.Layer):
    """Base class of kmtl's weighting strategies (see the module docstring).

    Subclasses set `level`, validate and store their constructor arguments
    (with `kmtl.weighting._checks`), create state in `build_state` with
    `self.add_state(...)`, implement `combine` (loss level) or
    `weights_from_gram` / `combine_gradients` (gradient level), and return
    every constructor argument from `get_config`.

    Args:
        update_every: gradient level only: recompute the task weights every
            `update_every` steps and reuse the last weights in between (those
            steps take one ordinary backward pass of the weighted loss).
        mode: gradient level only: `"parameters"` (per-task gradients of the
            shared variables) or `"representation"` (of the shared features,
            then one backward pass through the trunk). Default: the class's
            `default_mode`.
        engine: gradient level, parameters mode: how per-task gradients are
            obtained. `"jacobian"` holds every task's gradient of every shared
            variable at once (`T x P` floats); `"gram"` (Gram-based strategies
            on chain trunks) accumulates the `T x T` Gram matrix stage by stage
            and then takes one weighted backward pass, so its extra memory is
            about `T x` the largest shared stage; `"auto"` picks `"gram"` where
            it applies and is the faster or leaner path (see
            `kmtl.backend.tensorflow.gram`).
        name: layer name.
    """

    level = "loss"
    #: Gradient level: True if `weights_from_gram` is all the strategy needs.
    gram_based = False
    #: Whether the strategy may combine representation gradients.
    supports_representation = True
    #: Gradient level: where per-task gradients are taken by default.
    default_mode = "parameters"
    #: Whether the math compiles under XLA (`jit_compile=True`).
    jit_safe = True

    def __init__(self, update_every: int = 1, mode: str | None = None, engine: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.update_every = _checks.positive_int(update_every, "update_every")
        if mode is None:
            mode = self.default_mode
        _checks.choice(mode, "mode", ("parameters", "representation"))
        if mode == "representation" and not self.supports_representation:
            raise ValueError(
                f"{type(self).__name__} cannot work on the shared representation. Received: mode={mode!r}"
            )
        self.mode = mode
        self.engine = _checks.choice(engine, "engine", ENGINES)
        if engine == "gram" and self.level == "gradient" and not self.gram_based:
            raise ValueError(
                f"{type(self).__name__} needs the full per-task gradients, not only their Gram matrix. "
                f"Received: engine={engine!r}"
            )
        self.task_names: list[str] = []
        self.state_names: list[str] = []

    # --- state -------------------------------------------------------------
    def build(self, task_names: Sequence[str]):
        """Creates the state for these tasks (called by the model's compile).

        `task_names` is stored in the build config, so a reloaded model
        rebuilds the same state before its variables are restored.
        """
        task_names = _checks.task_names(task_names)
        self.task_names = task_names
        self.state_names = []
        self.task_weights = self.add_state("task_weights", (len(task_names),), "ones")
        self.build_state(len(task_names))
        self.built = True

    def get_build_config(self):
        # An unbuilt strategy has no build config: loading it leaves it unbuilt.
        return {"task_names": list(self.task_names)} if self.built else None

    def build_from_config(self, config):
        if config and config.get("task_names"):
            self.build(config["task_names"])

    def add_state(self, name: str, shape, initializer="zeros", dtype: str = "float32"):
        """Adds a non-trainable state variable (identical on every replica)."""
        if name in self.state_names:
            raise ValueError(f"State {name!r} of {type(self).__name__} is defined twice.")
        variable = self.add_weight(
            shape=shape,
            initializer=initializer,
            dtype=dtype,
            trainable=False,
            aggregation="only_first_replica",
            name=name,
        )
        self.state_names.append(name)
        return variable

    def build_state(self, num_tasks: int) -> None:
        """Creates strategy-specific state with `add_state`. Default: none."""

    def state_variables(self) -> dict:
        """`{name: variable}` of every state variable (not the trainable ones)."""
        return {name: getattr(self, name) for name in self.state_names}

    def state(self) -> dict:
        """`{name: tensor}`: a snapshot of the current value of every state variable."""
        return {name: ops.copy(v) for name, v in self.state_variables().items()}

    def commit(self, new_state: dict, accept=None) -> None:
        """Assigns `new_state` (a subset of the state names) to the variables.

        Args:
            new_state: `{name: tensor}` as returned by the pure functions.
            accept: optional scalar bool tensor; where it is False every
                variable keeps its value (the step passes "the batch was
                finite").

        Raises:
            KeyError: for a name that is not a state variable.
        """
        variables = self.state_variables()
        for name, value in new_state.items():
            if name not in variables:
                raise KeyError(
                    f"{type(self).__name__} has no state {name!r}; its state is {sorted(variables)}."
                )
            variable = variables[name]
            value = ops.cast(value, variable.dtype)
            if accept is not None:
                value = ops.where(accept, value, variable)
            variable.assign(value)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    # --- loss level --------------------------------------------------------
    def combine(self, losses, values, present, step, state):
        """Loss level: `(total, weights, new_state)` from per-task losses.

        `total` is the scalar to differentiate, `weights` the `[T]`
        derivatives `d total / d losses` (no gradient), `new_state` the state
        after this step (only the entries that change).
        """
        raise NotImplementedError(f"{type(self).__name__} is a gradient-level strategy: it has no `combine`.")

    # --- gradient level ----------------------------------------------------
    def weights_from_gram(self, gram, values, present, step, state):
        """Gradient level, Gram-based: `(alpha, new_state)` from the `[T, T]` Gram matrix."""
        raise NotImplementedError(f"{type(self).__name__} does not work from the Gram matrix alone.")

    def combine_gradients(self, grads, values, present, step, state):
        """Gradient level: `(combined, alpha, new_state)` from stacked per-task gradients.

        Args:
            grads: list over shared variables (or representation tensors) of
                `[T, *shape]` tensors.

        Returns:
            `combined`: one tensor of `shape` per entry of `grads`; `alpha`:
            `[T]` effective task weights (logged); `new_state`.

        The default (Gram-based strategies) computes the Gram matrix variable
        by variable, calls `weights_from_gram` and returns `sum_t alpha_t g_t`.
        """
        alpha, new_state = self.weights_from_gram(gram_matrix(grads), values, present, step, state)
        return combine_with(alpha, grads), alpha, new_state

    # --- pure function form ------------------------------------------------
    def aggregate(self, G, losses=None, present=None, step: int = 0):
        """Matrix in, vector out: `[T, D]` task gradients -> `[D]` update.

        Pure: uses the current state (a fresh one if the strategy is not
        built yet, without building it) and changes nothing. `losses`
        default to ones, `present` to all tasks, `step` to 0. For loss-level
        strategies the update is `G^T weights` with the weights `combine`
        gives for `losses`.
        """
        G = ops.convert_to_tensor(G)
        if len(G.shape) != 2:
            raise ValueError(f"`G` must be a [num_tasks, dim] matrix. Received: shape={tuple(G.shape)}")
        num_tasks = int(G.shape[0])
        strategy = self
        if not self.built:
            strategy = type(self).from_config(self.get_config())
            strategy.build([f"task_{i}" for i in range(num_tasks)])
        if strategy.num_tasks != num_tasks:
            raise ValueError(
                f"{type(self).__name__} was built for {strategy.num_tasks} tasks. "
                f"Received: G with {num_tasks} rows"
            )
        values = ops.ones((num_tasks,), G.dtype) if losses is None else ops.cast(losses, G.dtype)
        present = ops.ones((num_tasks,), "bool") if present is None else ops.cast(present, "bool")
        step = ops.convert_to_tensor(step, dtype="int64")
        state = strategy.state()
        if strategy.level == "loss":
            _, weights, _ = strategy.combine(values, values, present, step, state)
            return combine_with(weights, [G])[0]
        combined, _, _ = strategy.combine_gradients([G], values, present, step, state)
        return combined[0]

    # --- hooks -------------------------------------------------------------
    def on_epoch_end(self, epoch: int) -> None:
        """Called eagerly at the end of every training epoch (e.g. DWA)."""

    def get_config(self):
        config = super().get_config()
        config.update({"update_every": self.update_every, "mode": self.mode, "engine": self.engine})
        return config


def gram_matrix(grads):
    """`[T, T]` Gram matrix of stacked per-task gradients, summed variable by variable."""
    gram = None
    for g in grads:
        flat = ops.reshape(g, (ops.shape(g)[0], -1))
        # einsum contracts in place; matmul(flat, transpose(flat)) copied `flat` first.
        part = ops.einsum("ti,si->ts", flat, flat)
        gram = part if gram is None else gram + part
    return gram


def combine_with(alpha, grads):
    """`[sum_t alpha_t g_t for g in grads]`."""
    return [ops.tensordot(ops.cast(alpha, g.dtype), g, axes=1) for g in grads]


__all__ = ["ENGINES", "Weighting", "combine_with", "gram_matrix"]
