"""Output heads: one per task, each knowing its layers, loss and metrics.

A head's `name` is the task's key everywhere: the model output, the target
key in the dataset, the history prefix (`digit_loss`, `val_digit_accuracy`),
the SavedModel output and the evaluation report.

Example:

>>> from kmtl import heads
>>> tasks = [heads.Classification("digit", num_classes=10), heads.Binary("parity")]
>>> [h.name for h in tasks]
['digit', 'parity']
"""

from __future__ import annotations

import keyword
from typing import Sequence

import keras

from kmtl import registry
from kmtl.registry import register


def output_dtype() -> str | None:
    """`"float32"` under a mixed-precision policy, else None (the layer's default).

    A task's last layer (its logits and output activation) computes in
    float32 under `keras.mixed_precision` policies `"mixed_float16"` and
    `"mixed_bfloat16"`, so that probabilities and losses keep float32
    precision (float16's softmax and sigmoid saturate early). Under any
    other global policy the output layers follow it.
    """
    if keras.config.dtype_policy().compute_dtype in ("float16", "bfloat16"):
        return "float32"
    return None


def _check_name(name) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(
            "A head name must be a valid Python identifier (letters, digits, "
            f"underscores; not a keyword). Received: name={name!r}"
        )
    return name


def _check_positive_int(value, argument: str, head: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Head {head!r}: `{argument}` must be a positive integer. Received: {argument}={value!r}"
        )
    return value


class Head:
    """Base class of the head specifications.

    Args:
        name: task name (a valid identifier, unique within a model).
        hidden_units: sizes of the head's own Dense tower, applied to the
            shared features before the output layer. Empty for none.
        activation: activation of the tower layers.
        dropout: dropout rate after each tower layer.
    """

    kind = ""
    #: Output size of the final layer; set by subclasses.
    units = 1

    def __init__(
        self,
        name: str,
        hidden_units: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        self.name = _check_name(name)
        self.hidden_units = tuple(_check_positive_int(u, "hidden_units", name) for u in hidden_units)
        self.activation = activation
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"Head {name!r}: `dropout` must be in [0, 1). Received: dropout={dropout!r}")
        self.dropout = float(dropout)

    # --- layers ------------------------------------------------------------
    def output_activation(self) -> str:
        raise NotImplementedError

    def tower(self, features, prefix: str | None = None):
        """Applies the head's own tower (flatten, `hidden_units`, dropout) to `features`.

        Layers are named `<prefix>_hidden_<i>` (`prefix` defaults to the head's name).
        """
        prefix = prefix or self.name
        x = features
        if len(x.shape) > 2:
            x = keras.layers.Flatten(name=f"{prefix}_flatten")(x)
        for i, units in enumerate(self.hidden_units):
            x = keras.layers.Dense(units, activation=self.activation, name=f"{prefix}_hidden_{i}")(x)
            if self.dropout:
                x = keras.layers.Dropout(self.dropout, name=f"{prefix}_dropout_{i}")(x)
        return x

    def __call__(self, features):
        """Applies the head's tower and output layer to `features`."""
        x = self.tower(features)
        return keras.layers.Dense(
            self.units,
            activation=self.output_activation(),
            name=f"{self.name}_output",
            dtype=output_dtype(),
        )(x)

    # --- training ----------------------------------------------------------
    def loss(self) -> keras.losses.Loss:
        """The default loss (mean over labelled examples only)."""
        raise NotImplementedError

    def metrics(self) -> list:
        """The default metrics."""
        raise NotImplementedError

    def target_shape(self) -> tuple:
        """Per-example target shape; `()` also accepts `(1,)`."""
        return ()

    def label_range(self):
        """`(low, high, integer)`: valid label values, or None if unbounded."""
        return None

    def check_target_spec(self, shape, dtype) -> None:
        """Raises ValueError if a target of `shape` (with batch) cannot fit."""
        expected = self.target_shape()
        per_example = tuple(shape[1:]) if len(shape) else None
        allowed = {expected}
        if expected == ():
            allowed.add((1,))
        if per_example is not None and per_example not in allowed:
            shown = " or ".join(str((None,) + a) for a in sorted(allowed, key=len))
            raise ValueError(
                f"Head {self.name!r} ({self.kind}) expects targets of shape "
                f"{shown}. Received: shape={tuple(shape)}"
            )
        dtype = keras.backend.standardize_dtype(dtype)
        if dtype in ("string", "bool") or dtype.startswith("complex"):
            raise ValueError(
                f"Head {self.name!r} ({self.kind}) expects numeric targets. Received: dtype={dtype}"
            )

    # --- config ------------------------------------------------------------
    def get_config(self) -> dict:
        return {
            "name": self.name,
            "hidden_units": list(self.hidden_units),
            "activation": self.activation,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, self.name))


@register("head", "classification")
class Classification(Head):
    """Single-label classification into `num_classes` classes (softmax).

    Targets are integer class indices of shape `(batch,)` or `(batch, 1)`.
    Loss: sparse categorical cross-entropy; metric: `accuracy`.
    """

    kind = "classification"

    def __init__(self, name: str, num_classes: int, **kwargs):
        super().__init__(name, **kwargs)
        self.num_classes = _check_positive_int(num_classes, "num_classes", name)
        if num_classes < 2:
            raise ValueError(
                f"Head {name!r}: a classification head needs `num_classes` >= 2 "
                f"(use heads.Binary for two-way tasks with one unit). "
                f"Received: num_classes={num_classes}"
            )
        self.units = self.num_classes

    def output_activation(self):
        return "softmax"

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy(
            reduction="mean_with_sample_weight", name=f"{self.name}_loss"
        )

    def metrics(self):
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def label_range(self):
        return (0, self.num_classes - 1, True)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@register("head", "binary")
class Binary(Head):
    """Binary classification with one sigmoid unit.

    Targets are 0/1 (or soft labels in [0, 1]) of shape `(batch,)` or
    `(batch, 1)`. Loss: binary cross-entropy; metrics: `accuracy`, `auc`.
    """

    kind = "binary"

    def output_activation(self):
        return "sigmoid"

    def loss(self):
        return keras.losses.BinaryCrossentropy(reduction="mean_with_sample_weight", name=f"{self.name}_loss")

    def metrics(self):
        return [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")]

    def label_range(self):
        return (0, 1, False)


@register("head", "multi_label")
class MultiLabel(Head):
    """Multi-label classification: `num_labels` independent sigmoid units.

    Targets are 0/1 matrices of shape `(batch, num_labels)`. Loss: binary
    cross-entropy averaged over labels; metrics: `accuracy`, `auc`.
    """

    kind = "multi_label"

    def __init__(self, name: str, num_labels: int, **kwargs):
        super().__init__(name, **kwargs)
        self.num_labels = _check_positive_int(num_labels, "num_labels", name)
        self.units = self.num_labels

    def output_activation(self):
        return "sigmoid"

    def loss(self):
        return keras.losses.BinaryCrossentropy(reduction="mean_with_sample_weight", name=f"{self.name}_loss")

    def metrics(self):
        return [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc", multi_label=True, num_labels=self.num_labels),
        ]

    def target_shape(self):
        return (self.num_labels,)

    def label_range(self):
        return (0, 1, False)

    def get_config(self):
        return {**super().get_config(), "num_labels": self.num_labels}


@register("head", "regression")
class Regression(Head):
    """Regression with `units` linear outputs.

    Targets have shape `(batch,)`/`(batch, 1)` for one unit, else
    `(batch, units)`. Loss: mean squared error; metrics: `mae`, `rmse`.
    """

    kind = "regression"

    def __init__(self, name: str, units: int = 1, **kwargs):
        super().__init__(name, **kwargs)
        self.units = _check_positive_int(units, "units", name)

    def output_activation(self):
        return None

    def loss(self):
        return keras.losses.MeanSquaredError(reduction="mean_with_sample_weight", name=f"{self.name}_loss")

    def metrics(self):
        return [keras.metrics.MeanAbsoluteError(name="mae"), keras.metrics.RootMeanSquaredError(name="rmse")]

    def target_shape(self):
        return () if self.units == 1 else (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def get(identifier) -> Head:
    """Returns a head from a `Head`, a config dict or a `{"kind": ...}` dict.

    Accepted dicts: `{"kind": "classification", "name": "digit",
    "num_classes": 10}` (the form used in CLI config files), or a Keras
    serialized head.

    Raises:
        ValueError: for an unknown head kind or a malformed identifier.
    """
    if isinstance(identifier, Head):
        return identifier
    if isinstance(identifier, dict):
        if "kind" in identifier:
            config = dict(identifier)
            kind = config.pop("kind")
            if kind not in registry.names("head"):
                raise ValueError(
                    f"Unknown head kind {kind!r}. Known kinds: {', '.join(registry.names('head'))}. Received: kind={kind!r}"
                )
            return registry.lookup("head", kind)(**config)
        if "class_name" in identifier:
            obj = keras.saving.deserialize_keras_object(identifier)
            if isinstance(obj, Head):
                return obj
    raise ValueError(
        "A head must be a kmtl.heads.Head (e.g. heads.Classification('digit', "
        f"num_classes=10)) or a dict with a 'kind'. Received: {identifier!r}"
    )


def validate(heads_list) -> list[Head]:
    """Checks a list of heads: non-empty, all heads, unique names."""
    if isinstance(heads_list, Head):
        heads_list = [heads_list]
    heads_list = [get(h) for h in heads_list]
    if not heads_list:
        raise ValueError("A multi-task model needs at least one head. Received: heads=[]")
    seen = set()
    for head in heads_list:
        if head.name in seen:
            raise ValueError(
                f"Head names must be unique. Received: duplicate name {head.name!r} "
                f"in {[h.name for h in heads_list]}"
            )
        seen.add(head.name)
    return heads_list


__all__ = ["Head", "Classification", "Binary", "MultiLabel", "Regression", "get", "output_dtype", "validate"]
