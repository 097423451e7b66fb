"""Reusable, serializable layers of the soft-sharing and expert architectures.

* `ExpertGate`: a softmax gate, `[batch, num_experts]` weights from the
  flattened gate input (MMoE, CGC, PLE).
* `ExpertMixture`: the gate-weighted sum of expert outputs.
* `CrossStitch`: a learned `T x T` linear mix of the tasks' features
  (cross-stitch networks).
* `TaskAttention`: one task's soft attention mask over a shared conv stage
  (MTAN).

Example:

>>> import keras
>>> from kmtl.architectures import layers
>>> x = keras.Input((16,))
>>> experts = [keras.layers.Dense(8)(x) for _ in range(3)]
>>> gate = layers.ExpertGate(3)(x)
>>> tuple(layers.ExpertMixture()([gate] + experts).shape)
(None, 8)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def _shape_text(shapes) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)


@keras.saving.register_keras_serializable(package="kmtl")
class ExpertGate(keras.layers.Layer):
    """Softmax gate over `num_experts` experts.

    Flattens its input, applies a Dense layer with `num_experts` units and a
    softmax, so each row of the output sums to 1.

    Args:
        num_experts: number of experts the gate weighs (>= 1).
        **kwargs: base layer arguments (`name`, ...).

    Raises:
        ValueError: if `num_experts < 1`.

    References:
        Ma, J. et al. (2018). Modeling Task Relationships in Multi-task
        Learning with Multi-gate Mixture-of-Experts. KDD.
    """

    def __init__(self, num_experts: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(
                f"`num_experts` must be a positive integer. Received: num_experts={num_experts!r}"
            )
        self.num_experts = num_experts

    def build(self, input_shape):
        features = int(np.prod(input_shape[1:]))
        self.kernel = self.add_weight(
            name="kernel", shape=(features, self.num_experts), initializer="glorot_uniform"
        )
        self.bias = self.add_weight(name="bias", shape=(self.num_experts,), initializer="zeros")

    def call(self, inputs):
        flat = ops.reshape(inputs, (ops.shape(inputs)[0], -1))
        return ops.softmax(ops.matmul(flat, self.kernel) + self.bias, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_experts)

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}


@keras.saving.register_keras_serializable(package="kmtl")
class ExpertMixture(keras.layers.Layer):
    """Gate-weighted sum of expert outputs.

    Called on `[gate, expert_0, ..., expert_{E-1}]` where `gate` has shape
    `[batch, E]` and the experts all have the same shape (vectors or feature
    maps). Returns `sum_i gate[:, i] * expert_i`. Has no weights.

    Raises:
        ValueError: if the number of experts does not match the gate, or the
            experts' shapes differ.
    """

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) < 2:
            raise ValueError(
                f"ExpertMixture is called on [gate, expert_0, ...]. Received: input shapes {input_shape!r}"
            )
        gate, experts = input_shape[0], input_shape[1:]
        if gate[-1] is not None and gate[-1] != len(experts):
            raise ValueError(
                f"The gate weighs {gate[-1]} experts but {len(experts)} expert outputs were "
                f"given. Received: input shapes {_shape_text(input_shape)}"
            )
        if any(tuple(e[1:]) != tuple(experts[0][1:]) for e in experts):
            raise ValueError(
                f"All experts must have the same output shape. Received: expert shapes {_shape_text(experts)}"
            )

    def call(self, inputs):
        gate, experts = inputs[0], inputs[1:]
        stacked = ops.stack(experts, axis=1)  # [batch, E, ...]
        weights = ops.reshape(gate, ops.shape(gate) + (1,) * (len(stacked.shape) - 2))
        return ops.sum(ops.cast(weights, stacked.dtype) * stacked, axis=1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[1])


@keras.saving.register_keras_serializable(package="kmtl")
class CrossStitch(keras.layers.Layer):
    """Cross-stitch unit: each task's output is a learned mix of all tasks' inputs.

    Called on a list of `T >= 2` tensors of equal shape; returns a list of
    `T` tensors, `out_i = sum_j alpha[i, j] * x_j`. `alpha` is initialised to
    `self_weight` on the diagonal and `(1 - self_weight) / (T - 1)` elsewhere
    (rows sum to 1), i.e. near identity for the default 0.9.

    Args:
        self_weight: initial weight of a task's own features, in (0, 1].
        **kwargs: base layer arguments.

    Raises:
        ValueError: for `self_weight` outside (0, 1], fewer than two inputs
            or inputs of different shapes.

    References:
        Misra, I., Shrivastava, A., Gupta, A. & Hebert, M. (2016).
        Cross-stitch Networks for Multi-task Learning. CVPR.
    """

    def __init__(self, self_weight: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        if (
            isinstance(self_weight, bool)
            or not isinstance(self_weight, (int, float))
            or not 0 < self_weight <= 1
        ):
            raise ValueError(f"`self_weight` must be in (0, 1]. Received: self_weight={self_weight!r}")
        self.self_weight = float(self_weight)

    def build(self, input_shape):
        if (
            not isinstance(input_shape, (list, tuple))
            or len(input_shape) < 2
            or not isinstance(input_shape[0], (list, tuple))
        ):
            raise ValueError(
                "A cross-stitch unit mixes the features of two or more tasks; call it on a "
                f"list of tensors. Received: input shapes {input_shape!r}"
            )
        if any(tuple(s[1:]) != tuple(input_shape[0][1:]) for s in input_shape):
            raise ValueError(
                "Cross-stitched features must all have the same shape. "
                f"Received: shapes {_shape_text(input_shape)}"
            )
        num = len(input_shape)
        other = (1.0 - self.self_weight) / (num - 1)
        initial = np.full((num, num), other, "float32")
        np.fill_diagonal(initial, self.self_weight)
        self.alpha = self.add_weight(
            name="alpha", shape=(num, num), initializer=keras.initializers.Constant(initial)
        )

    def call(self, inputs):
        stacked = ops.stack(inputs, axis=0)  # [T, batch, ...]
        mixed = ops.tensordot(ops.cast(self.alpha, stacked.dtype), stacked, axes=1)
        return [mixed[i] for i in range(len(inputs))]

    def compute_output_shape(self, input_shape):
        return [tuple(s) for s in input_shape]

    def get_config(self):
        return {**super().get_config(), "self_weight": self.self_weight}


@keras.saving.register_keras_serializable(package="kmtl")
class TaskAttention(keras.layers.Layer):
    """One task's attention module over a shared conv stage (MTAN, simplified).

    Called on the shared stage features `f` alone (first stage), or on
    `[f, previous]` where `previous` is this task's attended features of the
    stage before. `previous` is passed through a 3x3 conv (`filters`,
    ReLU) and max-pooled to the resolution of `f`; the mask is
    `sigmoid(conv1x1(relu(conv1x1(concat[f, previous]))))` with as many
    channels as `f`, and the output is `mask * f`.

    Simplification of the paper: the mask is computed from the stage
    output itself (not from the features before the stage's last layer),
    and the 3x3 "shared" conv between attention modules is task-specific.

    Args:
        filters: channels of the hidden 1x1 conv and of the 3x3 conv on
            `previous` (the mask always has as many channels as `f`).
        **kwargs: base layer arguments.

    Raises:
        ValueError: for `filters < 1` or inputs that are not 4-D feature maps.

    References:
        Liu, S., Johns, E. & Davison, A. J. (2019). End-to-End Multi-Task
        Learning with Attention. CVPR.
    """

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"`filters` must be a positive integer. Received: filters={filters!r}")
        self.filters = filters

    def build(self, input_shape):
        with_previous = isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple))
        shapes = list(input_shape) if with_previous else [input_shape]
        if any(len(s) != 4 for s in shapes):
            raise ValueError(
                "TaskAttention works on conv feature maps (batch, height, width, channels). "
                f"Received: input shapes {_shape_text(shapes)}"
            )
        shared = shapes[0]
        self.previous_conv = self.previous_pool = None
        if with_previous:
            previous = shapes[1]
            self.previous_conv = keras.layers.Conv2D(
                self.filters, 3, padding="same", activation="relu", name="previous_conv"
            )
            self.previous_conv.build(previous)
            ratio = int(previous[1]) // int(shared[1])
            if ratio > 1:
                self.previous_pool = keras.layers.MaxPooling2D(ratio, name="previous_pool")
            concat_channels = int(shared[-1]) + self.filters
        else:
            concat_channels = int(shared[-1])
        self.hidden = keras.layers.Conv2D(self.filters, 1, activation="relu", name="hidden")
        self.hidden.build(tuple(shared[:-1]) + (concat_channels,))
        self.mask = keras.layers.Conv2D(int(shared[-1]), 1, activation="sigmoid", name="mask")
        self.mask.build(tuple(shared[:-1]) + (self.filters,))

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            shared, previous = inputs
            previous = self.previous_conv(previous)
            if self.previous_pool is not None:
                previous = self.previous_pool(previous)
            x = ops.concatenate([shared, previous], axis=-1)
        else:
            shared = x = inputs
        return self.mask(self.hidden(x)) * shared

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            return tuple(input_shape[0])
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


__all__ = ["CrossStitch", "ExpertGate", "ExpertMixture", "TaskAttention"]
