"""Soft parameter sharing: one trunk per task, corresponding kernels tied by a penalty."""

from __future__ import annotations

import math

import keras
from keras import ops

from kmtl import trunks as trunks_module
from kmtl.architectures import _common
from kmtl.architectures.base import Parts
from kmtl.registry import register

PENALTIES = ("l2", "trace")


def _check_penalty(penalty) -> str:
    return _common.choice(penalty, "penalty", PENALTIES, "soft_sharing")


def _check_strength(strength) -> float:
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not math.isfinite(strength)
        or strength < 0
    ):
        raise ValueError(
            f"soft_sharing: `strength` must be a finite number >= 0. Received: strength={strength!r}"
        )
    return float(strength)


def tying_penalty(kernels, penalty: str = "l2"):
    """The (unscaled) soft-sharing penalty of kernels, in float32.

    `kernels[l][t]` is task `t`'s kernel at layer position `l`; the kernels
    of one position have equal shapes. With `W_l` the `T x P_l` matrix whose
    row `t` is task `t`'s flattened kernel at position `l`:

    * `"l2"`: `sum_l sum_{s<t} ||W_l[s] - W_l[t]||^2`, the squared Euclidean
      (Frobenius) distances of every pair of tasks, computed as the equal
      `T * sum_l sum_t ||W_l[t] - mean_t W_l[t]||^2`;
    * `"trace"`: `sum_l ||W_l||_*`, the trace (nuclear) norm, the sum of the
      singular values of each `W_l` (its gradient is taken through
      `keras.ops.svd(..., compute_uv=False)`).

    Args:
        kernels: a list (layer positions) of lists (tasks) of tensors.
        penalty: `"l2"` or `"trace"`.

    Returns:
        A float32 scalar tensor.

    Example:

    >>> import numpy as np
    >>> from kmtl.architectures.soft_sharing import tying_penalty
    >>> a, b = np.zeros((2, 2), "float32"), np.ones((2, 2), "float32")
    >>> float(tying_penalty([[a, b]], "l2"))
    4.0
    """
    _check_penalty(penalty)
    total = ops.zeros((), "float32")
    for position in kernels:
        rows = ops.stack([ops.reshape(ops.cast(k, "float32"), (-1,)) for k in position])
        if penalty == "l2":
            deviation = rows - ops.mean(rows, axis=0, keepdims=True)
            value = len(position) * ops.sum(ops.square(deviation))
        else:
            value = ops.sum(ops.svd(rows, full_matrices=False, compute_uv=False))
        total = total + value
    return total


def _kernel_layer(block):
    """The Conv2D or Dense layer of a trunk block (each block has exactly one)."""
    (layer,) = [
        layer for layer in block.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    ]
    return layer


@keras.saving.register_keras_serializable(package="kmtl")
class SoftSharedTrunks(keras.layers.Layer):
    """One fresh copy of a trunk per task, tied by a penalty on their kernels.

    Applies task `t`'s trunk (blocks `<t>_trunk_block_<i>` and
    `<t>_trunk_dense_block_<i>` from `trunk.stages`) to the input and returns
    `{task: features}`. In every call it adds `strength * tying_penalty(K,
    penalty)` with `add_loss` (so it is in `model.losses`), `K[l][t]` being
    the kernel of block `l` of task `t`'s trunk (one Conv2D or Dense kernel
    per block; biases and batch-norm parameters are not tied). With
    `strength=0` no loss is added and the trunks are independent. The
    penalty is computed in float32 from the float32 variables, also under a
    mixed-precision policy.

    Args:
        trunk: a `kmtl.trunks.Trunk` (or a preset name / config dict).
        tasks: the task names, two or more.
        penalty: `"l2"` or `"trace"` (see `tying_penalty`).
        strength: the penalty's multiplier, a finite number >= 0.
        **kwargs: base layer arguments (`name`, ...).

    Raises:
        ValueError: for fewer than two tasks, an unknown penalty or a
            negative strength.
    """

    def __init__(self, trunk, tasks, penalty: str = "l2", strength: float = 1e-3, **kwargs):
        # Kernels are read in float32 for the penalty: the blocks cast for themselves.
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.trunk = trunks_module.get(trunk)
        self.tasks = [str(t) for t in tasks]
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(
                f"soft_sharing ties the trunks of two or more distinct tasks. Received: tasks={self.tasks}"
            )
        self.penalty = _check_penalty(penalty)
        self.strength = _check_strength(strength)
        self.columns = {t: self.trunk.stages(f"{t}_trunk") for t in self.tasks}

    def kernels(self) -> list:
        """`[[task kernels] per block position]`: the variables the penalty ties."""
        blocks = zip(*(self.columns[t] for t in self.tasks))
        return [[_kernel_layer(block).kernel for block in position] for position in blocks]

    def penalty_value(self):
        """The current unscaled penalty `tying_penalty(self.kernels(), self.penalty)`."""
        return tying_penalty(self.kernels(), self.penalty)

    def build(self, input_shape):
        for column in self.columns.values():
            shape = tuple(input_shape)
            for block in column:
                block.build(shape)
                shape = block.compute_output_shape(shape)

    def call(self, inputs, training=None):
        features = {}
        for task in self.tasks:
            x = inputs
            for block in self.columns[task]:
                x = block(x, training=training)
            features[task] = x
        if self.strength > 0:
            self.add_loss(self.strength * self.penalty_value())
        return features

    def compute_output_shape(self, input_shape):
        # Keras uses this for symbolic calls instead of tracing `call` (which would add a loss).
        shapes = {}
        for task in self.tasks:
            shape = tuple(input_shape)
            for block in self.columns[task]:
                shape = tuple(block.compute_output_shape(shape))
            shapes[task] = shape
        return shapes

    def get_config(self):
        config = {
            "trunk": keras.saving.serialize_keras_object(self.trunk),
            "tasks": list(self.tasks),
            "penalty": self.penalty,
            "strength": self.strength,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["trunk"] = keras.saving.deserialize_keras_object(config["trunk"])
        return cls(**config)


@register("architecture", "soft_sharing")
def build_soft_sharing(inputs, trunk, heads, penalty: str = "l2", strength: float = 1e-3) -> Parts:
    """One trunk per task; a penalty pulls corresponding kernels together.

    Every task has its own fresh copy of the trunk; a `SoftSharedTrunks`
    layer applies them and adds `strength * P` to the model's losses, where
    `P` ties the kernels of corresponding blocks (block `l` of every task's
    trunk; blocks counted as in `trunk.stages()`). With `W_l` the `T x P_l`
    matrix stacking the flattened kernels of block `l`, one row per task:

    * `penalty="l2"` (Duong et al. 2015, for any number of tasks):
      `P = sum_l sum_{s<t} ||W_l[s] - W_l[t]||_F^2
         = T * sum_l sum_t ||W_l[t] - mean_t W_l[t]||_F^2`;
    * `penalty="trace"` (Yang & Hospedales 2017, last-axis flattening):
      `P = sum_l ||W_l||_*`, the sum of the singular values of `W_l`.

    The penalty enters the total loss once, outside the tasks' losses:
    loss-level strategies weigh the task losses and add it unweighted;
    gradient-level strategies combine the tasks' gradients and the
    penalty's gradient is added to the combination once.

    Shared parameters: all task trunks (the encoder, with the penalty
    layer). A task's loss reaches only its own trunk; the trunks of the
    other tasks get their gradient from the penalty only. Task-specific: the
    heads. `supports_representation` is False: each decoder reads its own
    trunk's features (the encoder outputs `{task: features}`).

    Args:
        inputs: a single `keras.Input`.
        trunk: a `kmtl.trunks.Trunk` (dense or conv).
        heads: list of at least two `kmtl.heads.Head`.
        penalty: `"l2"` or `"trace"`.
        strength: the penalty's multiplier, a finite number >= 0 (0: the
            tasks' models are independent).

    Returns:
        A `Parts` whose encoder outputs `{task: features}`.

    Raises:
        ValueError: for fewer than two heads, a dict of inputs, an unknown
            `penalty` or a negative `strength`.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Binary("parity")],
    ...     trunk=trunks.dense((32,)), input_shape=(8, 8, 1), architecture="soft_sharing",
    ...     penalty="trace", strength=1e-2)
    >>> sorted(model.output_names)
    ['digit', 'parity']

    References:
        Duong, L., Cohn, T., Bird, S. & Cook, P. (2015). Low Resource
        Dependency Parsing: Cross-lingual Parameter Sharing in a Neural
        Network Parser. ACL.

        Yang, Y. & Hospedales, T. (2017). Trace Norm Regularised Deep
        Multi-Task Learning. ICLR workshop.
    """
    # === Config ===
    _common.single_input(inputs, "soft_sharing")
    if len(heads) < 2:
        raise ValueError(
            f"soft_sharing ties the trunks of two or more tasks. Received: heads={[h.name for h in heads]}"
        )
    _check_penalty(penalty)
    _check_strength(strength)
    _common.check_trunk_input(trunk, inputs, "soft_sharing")

    # === Encoder: one trunk per task and the penalty ===
    trunks = SoftSharedTrunks(trunk, [h.name for h in heads], penalty, strength, name="soft_shared_trunks")
    features = trunks(inputs)
    encoder = keras.Model(inputs, features, name="encoder")

    # === Decoders ===
    return Parts(
        encoder=encoder,
        decoders=_common.own_feature_decoders(features, heads),
        supports_representation=False,
        shared_description="every task's trunk (tied by the soft-sharing penalty)",
    )
