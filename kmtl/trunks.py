"""Shared trunks: the layers that all tasks share.

A trunk is a small serializable *specification*. Calling it on a tensor
creates fresh layers and applies them (functional style); `stages()` returns
the same computation as a list of blocks, which soft-sharing architectures
(cross-stitch, MTAN, task-routed) use to interleave their own units.

Example:

>>> import keras
>>> from kmtl import trunks
>>> trunk = trunks.conv(filters=(32, 64), dense_units=(128,))
>>> features = trunk(keras.Input((28, 28, 1)))
>>> tuple(features.shape)
(None, 128)
"""

from __future__ import annotations

from typing import Sequence

import keras


def _positive_ints(values, argument: str, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(values, int):
        values = (values,)
    values = tuple(values)
    if (not values and not allow_empty) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
    ):
        raise ValueError(
            f"`{argument}` must be a {'possibly empty ' if allow_empty else 'non-empty '}"
            f"sequence of positive integers. Received: {argument}={values!r}"
        )
    return values


def _rate(value, argument: str) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{argument}` must be in [0, 1). Received: {argument}={value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="kmtl")
class Trunk:
    """A shared stack of layers: dense, conv, or the LeNet preset.

    Use the factories `dense()`, `conv()` and `lenet()` rather than this
    class directly.

    Args:
        kind: "dense" or "conv".
        filters: conv trunks: filters of each conv block (conv, [batch-norm],
            activation, max-pool, [dropout]).
        kernel_size: conv kernel size (one int or one per block).
        dense_units: Dense layers after the conv blocks (conv trunks) or the
            whole stack (dense trunks).
        activation: activation of every layer.
        dropout: dropout rate after each conv block and each Dense layer.
        batch_norm: batch-normalise before each conv activation.
        pool_size: max-pool size after each conv block (1 for none).
        conv_dropout: per-block dropout rates overriding `dropout` for conv
            blocks (used by the LeNet preset).
        padding: conv padding, "same" (keeps the size before pooling) or
            "valid" (the LeNet preset, as in the original network).
    """

    def __init__(
        self,
        kind: str,
        filters: Sequence[int] = (),
        kernel_size=3,
        dense_units: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        pool_size: int = 2,
        conv_dropout: Sequence[float] | None = None,
        padding: str = "same",
    ):
        if padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}")
        self.padding = padding
        if kind not in ("dense", "conv"):
            raise ValueError(f"Trunk `kind` must be 'dense' or 'conv'. Received: kind={kind!r}")
        self.kind = kind
        self.filters = _positive_ints(filters, "filters", allow_empty=kind == "dense")
        if kind == "dense" and self.filters:
            raise ValueError(f"A dense trunk takes no `filters`. Received: filters={self.filters}")
        kernel = (kernel_size,) * len(self.filters) if isinstance(kernel_size, int) else kernel_size
        self.kernel_size = _positive_ints(kernel, "kernel_size", allow_empty=True)
        if len(self.kernel_size) != len(self.filters):
            raise ValueError(
                "`kernel_size` needs one value per conv block. "
                f"Received: kernel_size={kernel_size!r} for filters={self.filters}"
            )
        self.dense_units = _positive_ints(dense_units, "dense_units", allow_empty=kind == "conv")
        self.activation = activation
        self.dropout = _rate(dropout, "dropout")
        self.batch_norm = bool(batch_norm)
        self.pool_size = _positive_ints(pool_size, "pool_size")[0]
        if conv_dropout is None:
            conv_dropout = (self.dropout,) * len(self.filters)
        self.conv_dropout = tuple(_rate(r, "conv_dropout") for r in conv_dropout)
        if len(self.conv_dropout) != len(self.filters):
            raise ValueError(
                "`conv_dropout` needs one rate per conv block. "
                f"Received: conv_dropout={conv_dropout!r} for filters={self.filters}"
            )

    @property
    def num_conv_stages(self) -> int:
        return len(self.filters)

    @property
    def num_blocks(self) -> int:
        """How many blocks `stages()` returns: the conv blocks, then the Dense blocks."""
        return len(self.filters) + len(self.dense_units)

    def stages(self, name: str = "trunk") -> list[keras.layers.Layer]:
        """Fresh blocks, one per conv block, then one for flatten + dense.

        Applying the blocks in order is the same computation as calling the
        trunk. A dense trunk has one block per Dense layer (the first one
        flattens its input).
        """
        blocks = []
        for i, (units, kernel, rate) in enumerate(zip(self.filters, self.kernel_size, self.conv_dropout)):
            layers = [keras.layers.Conv2D(units, kernel, padding=self.padding, name=f"{name}_conv_{i}")]
            if self.batch_norm:
                layers.append(keras.layers.BatchNormalization(name=f"{name}_bn_{i}"))
            layers.append(keras.layers.Activation(self.activation, name=f"{name}_act_{i}"))
            if self.pool_size > 1:
                layers.append(keras.layers.MaxPooling2D(self.pool_size, name=f"{name}_pool_{i}"))
            if rate:
                layers.append(keras.layers.Dropout(rate, name=f"{name}_conv_dropout_{i}"))
            blocks.append(keras.Sequential(layers, name=f"{name}_block_{i}"))
        for i, units in enumerate(self.dense_units):
            layers = []
            if i == 0:
                layers.append(keras.layers.Flatten(name=f"{name}_flatten"))
            layers.append(keras.layers.Dense(units, activation=self.activation, name=f"{name}_dense_{i}"))
            if self.dropout:
                layers.append(keras.layers.Dropout(self.dropout, name=f"{name}_dense_dropout_{i}"))
            blocks.append(keras.Sequential(layers, name=f"{name}_dense_block_{i}"))
        return blocks

    def __call__(self, x, name: str = "trunk"):
        """Applies a fresh copy of the trunk to `x` and returns the features."""
        if self.kind == "conv" and len(x.shape) != 4:
            raise ValueError(
                "A conv trunk needs image inputs of shape (batch, height, width, "
                f"channels). Received: input shape {tuple(x.shape)}"
            )
        for block in self.stages(name):
            x = block(x)
        return x

    def get_config(self) -> dict:
        return {
            "kind": self.kind,
            "filters": list(self.filters),
            "kernel_size": list(self.kernel_size),
            "dense_units": list(self.dense_units),
            "activation": self.activation,
            "dropout": self.dropout,
            "batch_norm": self.batch_norm,
            "pool_size": self.pool_size,
            "conv_dropout": list(self.conv_dropout),
            "padding": self.padding,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, Trunk) and self.get_config() == other.get_config()

    def __repr__(self):
        return f"Trunk({self.get_config()})"


def dense(units: Sequence[int] = (256, 128), activation: str = "relu", dropout: float = 0.0) -> Trunk:
    """A stack of Dense layers (non-flat inputs are flattened first)."""
    return Trunk("dense", dense_units=units, activation=activation, dropout=dropout)


def conv(
    filters: Sequence[int] = (32, 64),
    dense_units: Sequence[int] = (128,),
    kernel_size=3,
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
    pool_size: int = 2,
) -> Trunk:
    """Conv blocks (conv, [batch-norm], activation, max-pool, [dropout]),
    then flatten and Dense layers."""
    return Trunk(
        "conv",
        filters=filters,
        kernel_size=kernel_size,
        dense_units=dense_units,
        activation=activation,
        dropout=dropout,
        batch_norm=batch_norm,
        pool_size=pool_size,
    )


def lenet() -> Trunk:
    """The MultiLeNet shared encoder of Sener & Koltun (2018).

    conv 10@5x5 (valid), max-pool 2, ReLU; conv 20@5x5 (valid), dropout 0.5,
    max-pool 2, ReLU; flatten (320 features for 28x28 inputs); Dense 50 +
    ReLU. (Activation after pooling equals pooling after activation for ReLU
    and max-pool.)

    References:
        Sener, O. & Koltun, V. (2018). Multi-Task Learning as Multi-Objective
        Optimization. NeurIPS.
    """
    return Trunk(
        "conv",
        filters=(10, 20),
        kernel_size=(5, 5),
        dense_units=(50,),
        activation="relu",
        conv_dropout=(0.0, 0.5),
        pool_size=2,
        padding="valid",
    )


def get(identifier) -> Trunk:
    """Returns a trunk from a Trunk, a preset name, `"dense:<units>"` or a config dict.

    `"dense:64,32"` is `dense((64, 32))`; the presets are `lenet`, `conv`
    (`conv()`) and `dense` (`dense()`).

    Raises:
        ValueError: for an unknown preset or malformed config.
    """
    if isinstance(identifier, Trunk):
        return identifier
    presets = {"lenet": lenet, "conv": conv, "dense": dense}
    if isinstance(identifier, str) and identifier.startswith("dense:"):
        # "dense:64,32": a Dense stack of those sizes (a trunk a config file or flag can name).
        try:
            units = tuple(int(part) for part in identifier[len("dense:") :].split(","))
        except ValueError:
            units = ()
        if not units or min(units) < 1:
            raise ValueError(
                f'A "dense:<units>" trunk lists positive layer sizes, e.g. "dense:64,32". '
                f"Received: trunk={identifier!r}"
            )
        return dense(units)
    if isinstance(identifier, str):
        if identifier not in presets:
            raise ValueError(
                f"Unknown trunk {identifier!r}. Known presets: {', '.join(presets)}. "
                f"Received: trunk={identifier!r}"
            )
        return presets[identifier]()
    if isinstance(identifier, dict):
        config = dict(identifier.get("config", identifier))
        if (
            "kind" in config
            and config["kind"] in presets
            and set(config) - {"kind"}
            <= {
                "filters",
                "dense_units",
                "kernel_size",
                "activation",
                "dropout",
                "batch_norm",
                "pool_size",
                "units",
                "conv_dropout",
                "padding",
            }
        ):
            kind = config.pop("kind")
            if kind == "lenet":
                return lenet()
            if kind == "dense" and "dense_units" in config:
                config["units"] = config.pop("dense_units")
            if kind == "dense":
                return dense(**config)
            if "conv_dropout" in config:
                return Trunk("conv", **config)
            return conv(**config)
    raise ValueError(
        "A trunk must be a kmtl.trunks.Trunk, a preset name ('lenet', 'conv', "
        f"'dense'), 'dense:<units>' or a dict with a 'kind'. Received: trunk={identifier!r}"
    )


__all__ = ["Trunk", "dense", "conv", "lenet", "get"]
