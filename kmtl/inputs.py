"""Tabular feature inputs: raw columns in, one float vector out, inside the model.

A `Features` spec lists the model's raw input columns and how each one is
encoded. `adapt` computes what the encoders learn from data (vocabularies,
mean and variance, quantile bin boundaries); the spec, including that adapted
state, is a plain JSON-able config (like `kmtl.trunks.Trunk`), so
`Features.from_config` rebuilds an identical encoder without any data.

`kmtl.build_model(..., features=spec)` makes one raw `keras.Input` per feature
(named by the feature) and puts a `FeatureEncoder` layer at the start of the
model's shared encoder: the embedding tables are shared variables, updated by
every weighting strategy, saved in `.keras` files and exported with the
SavedModel, which therefore takes the raw values (strings included).

Feature kinds (the Keras layers that encode them):

| factory             | raw input (per example)        | encoding                                    |
|---------------------|--------------------------------|---------------------------------------------|
| `categorical`       | one string (or int64)          | `StringLookup`/`IntegerLookup`, `Embedding` |
| `hashed`            | one string (or int64)          | `Hashing`, `Embedding`                      |
| `numeric`           | one float                      | `Normalization` (one number)                |
| `bucketized`        | one float                      | `Discretization`, `Embedding`               |
| `multi_categorical` | `width` strings, padded by ""  | `StringLookup`, `Embedding`, mean/sum pool  |

The encoder's output is the concatenation of every feature's encoding, in
feature order (`Features.output_dim` floats).

Raw inputs are 1-D columns: shape `()` per example (`(width,)` for
`multi_categorical`), so `fit`, `evaluate` and `predict` take a dict of 1-D
arrays or a batched `tf.data.Dataset` of such dicts, and the SavedModel
signature takes `[batch]` tensors. `Features.standardize` (called by the
model's `fit`, `evaluate` and `predict`) checks the columns and turns NumPy
string arrays into string tensors, which Keras's array adapter cannot slice.

Gradients: lookups are not differentiable and pass no gradient; the
embedding tables are ordinary shared variables. kmtl's step hands the
optimizer dense gradients (`rows x dim` floats per table), and
gradient-level strategies in `mode="parameters"` (Jacobian or Gram engine)
form each task's gradient of every shared variable, `T x rows x dim` floats
per table (TensorFlow warns that it converts the embeddings' `IndexedSlices`
gradients to dense tensors). Keep vocabularies and hash bins moderate with
those strategies, or use `mode="representation"`.

Why not `keras.utils.FeatureSpace`: it encodes categories as one-hot or
integer indices only (no learned embeddings, no pooled multi-valued
columns), keeps its adapted state inside its layers (saved as their
variables and assets) rather than in a config that rebuilds it without data,
and adapts only on a `tf.data.Dataset` of feature dicts. kmtl uses the same
Keras layers it is built on (`StringLookup`, `IntegerLookup`, `Hashing`,
`Normalization`, `Discretization`) directly, plus `Embedding`; `adapt` runs
those layers' own `adapt` and stores what they learned in the spec.

Example:

>>> import numpy as np
>>> from kmtl import inputs
>>> features = inputs.Features([
...     inputs.categorical("user_id", embedding_dim=4),
...     inputs.numeric("age"),
... ])
>>> features.adapt({"user_id": np.array(["a", "b", "a"]), "age": np.array([20.0, 30.0, 40.0])}).adapted
True
>>> features.output_dim
5
"""

from __future__ import annotations

import collections
import math
import re
from typing import Sequence

import keras
import numpy as np

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMBINERS = ("mean", "sum")
_LOOKUP_DTYPES = ("string", "int64")
#: Batch size of the column datasets that `adapt` hands to the Keras layers.
_ADAPT_BATCH = 1024

# NumPy dtype kinds accepted per raw input dtype ("b": bool, "i"/"u": ints, "f": floats,
# "U"/"S"/"O": str, bytes, objects holding str or bytes).
_NUMPY_KINDS = {"string": "USO", "int64": "iu", "float32": "biuf"}
# Keras dtype names accepted per raw input dtype (tf.data element specs).
_SPEC_DTYPES = {
    "string": ("string",),
    "int64": ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"),
    "float32": (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "float16",
        "bfloat16",
        "float32",
        "float64",
    ),
}
_DTYPE_HINT = {
    "string": "strings (str or bytes)",
    "int64": "integers",
    "float32": "numbers (floats or ints)",
}


# ----------------------------------------------------------------- checks


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            "A feature name must be a Python identifier (letters, digits and '_', not starting with a "
            f"digit): it names the model input and the SavedModel argument. Received: name={name!r}"
        )
    return name


def _positive_int(value, option: str, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"Feature {name!r}: `{option}` must be an integer >= {minimum}. Received: {option}={value!r}"
        )
    return int(value)


def _choice(value, option: str, choices, name: str) -> str:
    if value not in choices:
        raise ValueError(
            f"Feature {name!r}: `{option}` must be one of {list(choices)}. Received: {option}={value!r}"
        )
    return value


def _short(values, limit: int = 10) -> str:
    """`repr` of a list, cut after `limit` items (vocabularies can be long)."""
    values = list(values)
    if len(values) <= limit:
        return repr(values)
    return repr(values[:limit])[:-1] + f", ... ({len(values)} values)]"


def _vocabulary(values, dtype: str, name: str, padding: bool = False) -> list | None:
    """A checked vocabulary as a list of plain str or int (None stays None)."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"Feature {name!r}: `vocabulary` must be a list of values. Received: {values!r}")
    out = []
    for value in values:
        if dtype == "string":
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            if not isinstance(value, str):
                raise ValueError(
                    f"Feature {name!r}: a string feature's vocabulary holds strings. "
                    f"Received: {value!r} in vocabulary={_short(values)}"
                )
            if padding and value == "":
                raise ValueError(
                    f'Feature {name!r}: "" is the padding of a multi_categorical feature and cannot be '
                    f"in its vocabulary. Received: vocabulary={_short(values)}"
                )
        else:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(
                    f"Feature {name!r}: an int64 feature's vocabulary holds integers. "
                    f"Received: {value!r} in vocabulary={_short(values)}"
                )
            value = int(value)
            if value == -1:
                raise ValueError(
                    f"Feature {name!r}: -1 is the OOV token of keras.layers.IntegerLookup and cannot be "
                    f"in the vocabulary. Received: vocabulary={_short(values)}"
                )
        out.append(value)
    duplicates = sorted((v for v, count in collections.Counter(out).items() if count > 1), key=str)
    if duplicates:
        raise ValueError(
            f"Feature {name!r}: the vocabulary repeats {_short(duplicates)}. Received: vocabulary={_short(out)}"
        )
    if not out:
        raise ValueError(
            f"Feature {name!r}: the vocabulary is empty (adapt found no values?). Received: vocabulary=[]"
        )
    return out


def _max_tokens(max_tokens, num_oov_indices: int, vocabulary, name: str, reserved: int = 0):
    if max_tokens is None:
        return None
    max_tokens = _positive_int(max_tokens, "max_tokens", name)
    if max_tokens <= num_oov_indices + reserved:
        raise ValueError(
            f"Feature {name!r}: `max_tokens` counts the OOV indices{' and the padding' if reserved else ''} "
            f"as in keras.layers.StringLookup, so it must exceed {num_oov_indices + reserved}. "
            f"Received: max_tokens={max_tokens}, num_oov_indices={num_oov_indices}"
        )
    if vocabulary is not None and len(vocabulary) + num_oov_indices + reserved > max_tokens:
        raise ValueError(
            f"Feature {name!r}: a vocabulary of {len(vocabulary)} values plus {num_oov_indices} OOV "
            f"indices exceeds max_tokens={max_tokens}. Received: vocabulary of length {len(vocabulary)}"
        )
    return max_tokens


def _finite_float(value, option: str, name: str, minimum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"Feature {name!r}: `{option}` must be a number. Received: {option}={value!r}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" and >= {minimum}" if minimum is not None else ""
        raise ValueError(f"Feature {name!r}: `{option}` must be finite{bound}. Received: {option}={value!r}")
    return value


def _embedding_dim(value, name: str) -> int:
    return _positive_int(value, "embedding_dim", name)


# ----------------------------------------------------------------- feature specs


class Feature:
    """One raw input column and its encoding (use the factories, e.g. `categorical`).

    Subclasses define `kind`, the raw input (`shape`, `dtype`), the encoding
    width (`output_dim`), which state `adapt` computes, the Keras layers of
    the encoding and how to apply them.
    """

    kind = ""

    def __init__(self, name: str):
        self.name = _check_name(name)
        self.state = None

    # --- raw input -------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        """Shape of one example's raw value (without the batch dimension)."""
        return ()

    @property
    def dtype(self) -> str:
        """Raw input dtype: "string", "int64" or "float32"."""
        return "float32"

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    # --- adaptation ------------------------------------------------------------
    @property
    def needs_adapt(self) -> bool:
        """Whether `adapt` computes this feature's state (nothing was given)."""
        return False

    @property
    def adapted(self) -> bool:
        return not self.needs_adapt or self.state is not None

    def adapt(self, column) -> None:
        """Computes the state from one column (a NumPy array or a batched dataset)."""

    # --- encoding --------------------------------------------------------------
    def layers(self) -> dict:
        """Fresh Keras layers of the encoding (needs the adapted state)."""
        raise NotImplementedError

    def encode(self, layers: dict, x):
        """`[batch, output_dim]` encoding of the raw batch `x` with `layers`."""
        raise NotImplementedError

    def example(self, size: int, rng) -> np.ndarray:
        """A raw batch of `size` valid values (known categories, typical numbers)."""
        raise NotImplementedError

    # --- config ----------------------------------------------------------------
    def options(self) -> dict:
        return {"name": self.name}

    def get_config(self) -> dict:
        return {"kind": self.kind, **self.options(), "state": self.state}

    @classmethod
    def from_config(cls, config):
        if not isinstance(config, dict):
            raise ValueError(f"A feature config is a dict. Received: {config!r}")
        config = dict(config)
        kind = config.pop("kind", cls.kind)
        if cls is Feature:
            if kind not in _KINDS:
                raise ValueError(
                    f"Unknown feature kind {kind!r}; expected one of {sorted(_KINDS)}. Received: {config!r}"
                )
            cls = _KINDS[kind]
        state = config.pop("state", None)
        try:
            feature = cls(**config)
        except TypeError as error:
            raise ValueError(f"Bad {kind} feature config ({error}). Received: {config!r}") from None
        if state is not None:
            feature.set_state(state)
        return feature

    def set_state(self, state: dict) -> None:
        """Restores adapted state (from a config); checked like given values."""
        raise ValueError(
            f"Feature {self.name!r} ({self.kind}) has no adapted state. Received: state={state!r}"
        )

    def __eq__(self, other):
        return isinstance(other, Feature) and self.get_config() == other.get_config()

    def __repr__(self):
        options = ", ".join(
            f"{k}={_short(v) if isinstance(v, list) else repr(v)}"
            for k, v in self.options().items()
            if k != "name"
        )
        state = "" if not self.needs_adapt else (", adapted" if self.state is not None else ", not adapted")
        return f"{self.kind}({self.name!r}{', ' if options else ''}{options}{state})"


def _lookup_layer(dtype: str, **kwargs):
    if dtype == "string":
        return keras.layers.StringLookup(**kwargs)
    return keras.layers.IntegerLookup(**kwargs)


def _learned_vocabulary(layer, dtype: str) -> list:
    vocabulary = layer.get_vocabulary(include_special_tokens=False)
    if dtype == "string":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in vocabulary]
    return [int(v) for v in vocabulary]


@keras.saving.register_keras_serializable(package="kmtl")
class Categorical(Feature):
    """A categorical column embedded through a vocabulary lookup (see `categorical`)."""

    kind = "categorical"
    #: Whether "" is padding (multi_categorical), hence not a vocabulary value.
    _padding = False

    def __init__(
        self,
        name: str,
        embedding_dim: int = 8,
        vocabulary: Sequence | None = None,
        max_tokens: int | None = None,
        num_oov_indices: int = 1,
        dtype: str = "string",
    ):
        super().__init__(name)
        self.embedding_dim = _embedding_dim(embedding_dim, name)
        self._dtype = _choice(dtype, "dtype", _LOOKUP_DTYPES, name)
        self.num_oov_indices = _positive_int(num_oov_indices, "num_oov_indices", name, minimum=0)
        self.vocabulary = _vocabulary(vocabulary, self._dtype, name)
        self.max_tokens = _max_tokens(max_tokens, self.num_oov_indices, self.vocabulary, name)

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def output_dim(self) -> int:
        return self.embedding_dim

    @property
    def needs_adapt(self) -> bool:
        return self.vocabulary is None

    @property
    def values(self) -> list | None:
        """The vocabulary in use: given, or adapted (None before `adapt`)."""
        if self.vocabulary is not None:
            return self.vocabulary
        return None if self.state is None else self.state["vocabulary"]

    def adapt(self, column) -> None:
        layer = _lookup_layer(
            self._dtype, max_tokens=self.max_tokens, num_oov_indices=self.num_oov_indices, mask_token=None
        )
        layer.adapt(column)
        self.set_state({"vocabulary": _learned_vocabulary(layer, self._dtype)})

    def set_state(self, state) -> None:
        if not isinstance(state, dict) or state.get("vocabulary") is None:
            raise ValueError(
                f"Feature {self.name!r}: the state is {{'vocabulary': [...]}}. Received: {state!r}"
            )
        self.state = {"vocabulary": _vocabulary(state["vocabulary"], self._dtype, self.name, self._padding)}

    def _lookup(self):
        return _lookup_layer(
            self._dtype,
            vocabulary=list(self.values),
            num_oov_indices=self.num_oov_indices,
            mask_token=None,
            name=f"{self.name}_lookup",
        )

    def layers(self) -> dict:
        lookup = self._lookup()
        return {
            "lookup": lookup,
            "embedding": keras.layers.Embedding(
                lookup.vocabulary_size(), self.embedding_dim, name=f"{self.name}_embedding"
            ),
        }

    def encode(self, layers, x):
        return layers["embedding"](layers["lookup"](x))

    def example(self, size, rng):
        values = self.values
        picked = [values[i] for i in rng.integers(0, len(values), size)]
        return np.array(picked, dtype=object if self._dtype == "string" else "int64")

    def options(self) -> dict:
        return {
            "name": self.name,
            "embedding_dim": self.embedding_dim,
            "vocabulary": self.vocabulary,
            "max_tokens": self.max_tokens,
            "num_oov_indices": self.num_oov_indices,
            "dtype": self._dtype,
        }


@keras.saving.register_keras_serializable(package="kmtl")
class MultiCategorical(Categorical):
    """A fixed-width array of categories, pooled into one embedding (see `multi_categorical`)."""

    kind = "multi_categorical"
    _padding = True

    def __init__(
        self,
        name: str,
        width: int,
        embedding_dim: int = 8,
        combiner: str = "mean",
        vocabulary: Sequence | None = None,
        max_tokens: int | None = None,
        num_oov_indices: int = 1,
    ):
        Feature.__init__(self, name)
        self.width = _positive_int(width, "width", name)
        self.embedding_dim = _embedding_dim(embedding_dim, name)
        self.combiner = _choice(combiner, "combiner", _COMBINERS, name)
        self._dtype = "string"
        self.num_oov_indices = _positive_int(num_oov_indices, "num_oov_indices", name, minimum=0)
        self.vocabulary = _vocabulary(vocabulary, "string", name, padding=True)
        self.max_tokens = _max_tokens(max_tokens, self.num_oov_indices, self.vocabulary, name, reserved=1)

    @property
    def shape(self) -> tuple:
        return (self.width,)

    def adapt(self, column) -> None:
        # The mask token "" (the padding) is left out of the adapted vocabulary.
        layer = keras.layers.StringLookup(
            max_tokens=self.max_tokens, num_oov_indices=self.num_oov_indices, mask_token=""
        )
        layer.adapt(column)
        self.set_state({"vocabulary": _learned_vocabulary(layer, "string")})

    def _lookup(self):
        return keras.layers.StringLookup(
            vocabulary=list(self.values),
            num_oov_indices=self.num_oov_indices,
            mask_token="",
            name=f"{self.name}_lookup",
        )

    def encode(self, layers, x):
        ids = layers["lookup"](x)  # [batch, width]; index 0 is the padding ""
        vectors = layers["embedding"](ids)  # [batch, width, dim]
        present = keras.ops.expand_dims(keras.ops.cast(keras.ops.not_equal(ids, 0), vectors.dtype), -1)
        total = keras.ops.sum(vectors * present, axis=1)
        if self.combiner == "sum":
            return total
        count = keras.ops.sum(present, axis=1)
        return total / keras.ops.maximum(count, keras.ops.ones_like(count))

    def example(self, size, rng):
        values = self.values
        rows = []
        for _ in range(size):
            count = int(rng.integers(0, self.width + 1))
            row = [values[i] for i in rng.integers(0, len(values), count)]
            rows.append(row + [""] * (self.width - count))
        return np.array(rows, dtype=object).reshape(size, self.width)

    def options(self) -> dict:
        return {
            "name": self.name,
            "width": self.width,
            "embedding_dim": self.embedding_dim,
            "combiner": self.combiner,
            "vocabulary": self.vocabulary,
            "max_tokens": self.max_tokens,
            "num_oov_indices": self.num_oov_indices,
        }


@keras.saving.register_keras_serializable(package="kmtl")
class Hashed(Feature):
    """A categorical column hashed into `num_bins` embeddings (see `hashed`)."""

    kind = "hashed"

    def __init__(
        self, name: str, num_bins: int, embedding_dim: int = 8, dtype: str = "string", salt: int | None = None
    ):
        super().__init__(name)
        self.num_bins = _positive_int(num_bins, "num_bins", name)
        self.embedding_dim = _embedding_dim(embedding_dim, name)
        self._dtype = _choice(dtype, "dtype", _LOOKUP_DTYPES, name)
        if salt is not None:
            salt = _positive_int(salt, "salt", name, minimum=0)
        self.salt = salt

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def output_dim(self) -> int:
        return self.embedding_dim

    def layers(self) -> dict:
        return {
            "hashing": keras.layers.Hashing(self.num_bins, salt=self.salt, name=f"{self.name}_hashing"),
            "embedding": keras.layers.Embedding(
                self.num_bins, self.embedding_dim, name=f"{self.name}_embedding"
            ),
        }

    def encode(self, layers, x):
        return layers["embedding"](layers["hashing"](x))

    def example(self, size, rng):
        values = rng.integers(0, 10 * self.num_bins, size)
        return values.astype(str).astype(object) if self._dtype == "string" else values.astype("int64")

    def options(self) -> dict:
        return {
            "name": self.name,
            "num_bins": self.num_bins,
            "embedding_dim": self.embedding_dim,
            "dtype": self._dtype,
            "salt": self.salt,
        }


def _adapted_float(value) -> float:
    return float(np.asarray(keras.ops.convert_to_numpy(value), dtype="float64").reshape(-1)[0])


@keras.saving.register_keras_serializable(package="kmtl")
class Numeric(Feature):
    """A number standardised with a mean and variance (see `numeric`)."""

    kind = "numeric"

    def __init__(self, name: str, mean: float | None = None, variance: float | None = None):
        super().__init__(name)
        if (mean is None) != (variance is None):
            raise ValueError(
                f"Feature {name!r}: give both `mean` and `variance` or neither (then `adapt` computes "
                f"them). Received: mean={mean!r}, variance={variance!r}"
            )
        self.mean = None if mean is None else _finite_float(mean, "mean", name)
        self.variance = None if variance is None else _finite_float(variance, "variance", name, minimum=0.0)

    @property
    def output_dim(self) -> int:
        return 1

    @property
    def needs_adapt(self) -> bool:
        return self.mean is None

    @property
    def moments(self) -> tuple | None:
        """`(mean, variance)` in use: given, or adapted (None before `adapt`)."""
        if self.mean is not None:
            return self.mean, self.variance
        return None if self.state is None else (self.state["mean"], self.state["variance"])

    def adapt(self, column) -> None:
        layer = keras.layers.Normalization(axis=None)
        layer.adapt(column)
        self.set_state({"mean": _adapted_float(layer.mean), "variance": _adapted_float(layer.variance)})

    def set_state(self, state) -> None:
        if not isinstance(state, dict):
            raise ValueError(
                f"Feature {self.name!r}: the state is {{'mean': m, 'variance': v}}. Received: {state!r}"
            )
        self.state = {
            "mean": _finite_float(state.get("mean"), "mean (adapted)", self.name),
            "variance": _finite_float(state.get("variance"), "variance (adapted)", self.name, minimum=0.0),
        }

    def layers(self) -> dict:
        mean, variance = self.moments
        return {
            "normalization": keras.layers.Normalization(
                axis=None, mean=mean, variance=variance, name=f"{self.name}_normalization"
            )
        }

    def encode(self, layers, x):
        return keras.ops.expand_dims(layers["normalization"](x), -1)

    def example(self, size, rng):
        mean, variance = self.moments
        return (mean + math.sqrt(variance) * rng.standard_normal(size)).astype("float32")

    def options(self) -> dict:
        return {"name": self.name, "mean": self.mean, "variance": self.variance}


def _boundaries(values, name: str, option: str) -> list:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"Feature {name!r}: `{option}` must be a list of numbers. Received: {values!r}")
    out = [_finite_float(v, option, name) for v in values]
    if not out or any(b < a for a, b in zip(out, out[1:])):
        raise ValueError(
            f"Feature {name!r}: `{option}` must be a non-empty, non-decreasing list of numbers. "
            f"Received: {option}={out!r}"
        )
    return out


@keras.saving.register_keras_serializable(package="kmtl")
class Bucketized(Feature):
    """A number cut into bins, each bin embedded (see `bucketized`)."""

    kind = "bucketized"

    def __init__(
        self,
        name: str,
        num_bins: int | None = None,
        embedding_dim: int = 8,
        bin_boundaries: Sequence[float] | None = None,
        epsilon: float = 0.01,
    ):
        super().__init__(name)
        self.embedding_dim = _embedding_dim(embedding_dim, name)
        self.epsilon = _finite_float(epsilon, "epsilon", name, minimum=0.0)
        self.bin_boundaries = (
            None if bin_boundaries is None else _boundaries(bin_boundaries, name, "bin_boundaries")
        )
        if num_bins is None and self.bin_boundaries is None:
            raise ValueError(
                f"Feature {name!r}: give `num_bins` (quantile bins computed by `adapt`) or `bin_boundaries`. "
                f"Received: num_bins=None, bin_boundaries=None"
            )
        if num_bins is not None:
            num_bins = _positive_int(num_bins, "num_bins", name, minimum=2)
            if self.bin_boundaries is not None and num_bins != len(self.bin_boundaries) + 1:
                raise ValueError(
                    f"Feature {name!r}: {len(self.bin_boundaries)} bin boundaries make "
                    f"{len(self.bin_boundaries) + 1} bins. Received: num_bins={num_bins}, "
                    f"bin_boundaries={self.bin_boundaries}"
                )
        self.num_bins = len(self.bin_boundaries) + 1 if num_bins is None else num_bins

    @property
    def output_dim(self) -> int:
        return self.embedding_dim

    @property
    def needs_adapt(self) -> bool:
        return self.bin_boundaries is None

    @property
    def boundaries(self) -> list | None:
        """The bin boundaries in use: given, or adapted (None before `adapt`)."""
        if self.bin_boundaries is not None:
            return self.bin_boundaries
        return None if self.state is None else self.state["bin_boundaries"]

    def adapt(self, column) -> None:
        layer = keras.layers.Discretization(num_bins=self.num_bins, epsilon=self.epsilon)
        layer.adapt(column)
        self.set_state({"bin_boundaries": [float(b) for b in layer.bin_boundaries]})

    def set_state(self, state) -> None:
        if not isinstance(state, dict):
            raise ValueError(
                f"Feature {self.name!r}: the state is {{'bin_boundaries': [...]}}. Received: {state!r}"
            )
        boundaries = _boundaries(state.get("bin_boundaries"), self.name, "bin_boundaries (adapted)")
        if len(boundaries) != self.num_bins - 1:
            raise ValueError(
                f"Feature {self.name!r}: {self.num_bins} bins need {self.num_bins - 1} boundaries. "
                f"Received: state={state!r}"
            )
        self.state = {"bin_boundaries": boundaries}

    def layers(self) -> dict:
        return {
            "discretization": keras.layers.Discretization(
                bin_boundaries=list(self.boundaries), name=f"{self.name}_discretization"
            ),
            "embedding": keras.layers.Embedding(
                self.num_bins, self.embedding_dim, name=f"{self.name}_embedding"
            ),
        }

    def encode(self, layers, x):
        return layers["embedding"](layers["discretization"](x))

    def example(self, size, rng):
        low, high = self.boundaries[0], self.boundaries[-1]
        spread = max(high - low, 1.0)
        return rng.uniform(low - 0.1 * spread, high + 0.1 * spread, size).astype("float32")

    def options(self) -> dict:
        return {
            "name": self.name,
            "num_bins": self.num_bins,
            "embedding_dim": self.embedding_dim,
            "bin_boundaries": self.bin_boundaries,
            "epsilon": self.epsilon,
        }


_KINDS = {cls.kind: cls for cls in (Categorical, Hashed, Numeric, Bucketized, MultiCategorical)}


# ----------------------------------------------------------------- factories


def categorical(
    name: str,
    embedding_dim: int = 8,
    vocabulary: Sequence | None = None,
    max_tokens: int | None = None,
    num_oov_indices: int = 1,
    dtype: str = "string",
) -> Categorical:
    """A categorical column: vocabulary lookup, then a learned embedding.

    `keras.layers.StringLookup` (or `IntegerLookup` for `dtype="int64"`) maps
    each value to an index and `keras.layers.Embedding` to a vector. Indices
    `0 .. num_oov_indices - 1` are the OOV embeddings, then the vocabulary.

    Args:
        name: the column and model input name (a Python identifier).
        embedding_dim: width of the embedding.
        vocabulary: the values, or None for `Features.adapt` to collect them
            (most frequent first, ties in sorted order).
        max_tokens: with `adapt`, the largest lookup size kept, counting the
            OOV indices (as `keras.layers.StringLookup`); None keeps every
            value seen.
        num_oov_indices: embeddings for values not in the vocabulary (an
            unseen value maps to a learned OOV embedding). 0 makes an unseen
            value an error when the model is called.
        dtype: "string" (str or bytes values) or "int64" (integers; -1 is
            `IntegerLookup`'s OOV token and always maps to an OOV index).

    Returns:
        A `Categorical` feature.

    Raises:
        ValueError: for a bad name or option, or a vocabulary with repeats or
            values of the wrong type.

    Example:

    >>> categorical("country", embedding_dim=4, vocabulary=["fr", "de"]).output_dim
    4
    """
    return Categorical(name, embedding_dim, vocabulary, max_tokens, num_oov_indices, dtype)


def hashed(
    name: str, num_bins: int, embedding_dim: int = 8, dtype: str = "string", salt: int | None = None
) -> Hashed:
    """A categorical column hashed into `num_bins` embeddings (no vocabulary, no `adapt`).

    `keras.layers.Hashing` (FarmHash64 fingerprint, or SipHash64 with `salt`)
    maps a value to a bin, stably across processes and platforms; distinct
    values may share a bin.

    Args:
        name: the column and model input name.
        num_bins: number of hash bins (embeddings).
        embedding_dim: width of the embedding.
        dtype: "string" or "int64".
        salt: optional integer salt of the hash.

    Returns:
        A `Hashed` feature.

    Raises:
        ValueError: for a bad name or option.

    Example:

    >>> hashed("zip_prefix", num_bins=64, embedding_dim=4).adapted
    True
    """
    return Hashed(name, num_bins, embedding_dim, dtype, salt)


def numeric(name: str, mean: float | None = None, variance: float | None = None) -> Numeric:
    """A number, standardised to `(x - mean) / sqrt(variance)` (one float of the output).

    `keras.layers.Normalization` with one scalar mean and variance (a zero
    variance divides by Keras's epsilon instead).

    Args:
        name: the column and model input name.
        mean: the mean, or None (with `variance`) for `adapt` to compute it.
        variance: the variance (>= 0).

    Returns:
        A `Numeric` feature.

    Raises:
        ValueError: for a bad name, only one of `mean` and `variance`, or a
            non-finite or negative value.

    Example:

    >>> numeric("age", mean=40.0, variance=100.0).output_dim
    1
    """
    return Numeric(name, mean, variance)


def bucketized(
    name: str,
    num_bins: int | None = None,
    embedding_dim: int = 8,
    bin_boundaries: Sequence[float] | None = None,
    epsilon: float = 0.01,
) -> Bucketized:
    """A number cut into bins (`keras.layers.Discretization`), each bin embedded.

    Bin `i` holds `boundaries[i-1] <= x < boundaries[i]`; values below the
    first boundary are bin 0, values at or above the last are the last bin.

    Args:
        name: the column and model input name.
        num_bins: number of bins (>= 2); `adapt` computes `num_bins - 1`
            approximate quantile boundaries.
        embedding_dim: width of the embedding.
        bin_boundaries: the boundaries (non-decreasing), instead of `adapt`.
        epsilon: error tolerance of the adapted quantiles (as `Discretization`).

    Returns:
        A `Bucketized` feature.

    Raises:
        ValueError: for neither `num_bins` nor `bin_boundaries`, a `num_bins`
            inconsistent with `bin_boundaries`, or a bad option.

    Example:

    >>> bucketized("year", bin_boundaries=[1990.0, 2000.0]).num_bins
    3
    """
    return Bucketized(name, num_bins, embedding_dim, bin_boundaries, epsilon)


def multi_categorical(
    name: str,
    width: int,
    embedding_dim: int = 8,
    combiner: str = "mean",
    vocabulary: Sequence[str] | None = None,
    max_tokens: int | None = None,
    num_oov_indices: int = 1,
) -> MultiCategorical:
    """Up to `width` string categories per example, padded with "", pooled into one embedding.

    Each example's raw value is a `[width]` string array; `""` is padding
    and contributes nothing. `combiner="mean"` averages the embeddings of
    the present values, `"sum"` adds them; a row with no values gives a zero
    vector. Unseen values follow `num_oov_indices` as in `categorical`.

    Args:
        name: the column and model input name.
        width: number of slots per example.
        embedding_dim: width of the embedding.
        combiner: "mean" or "sum".
        vocabulary: the values (without ""), or None for `adapt`.
        max_tokens: with `adapt`, the largest lookup size kept, counting the
            OOV indices and the padding.
        num_oov_indices: as in `categorical`.

    Returns:
        A `MultiCategorical` feature.

    Raises:
        ValueError: for a bad name or option, or "" in the vocabulary.

    Example:

    >>> multi_categorical("genres", width=6, embedding_dim=8).shape
    (6,)
    """
    return MultiCategorical(name, width, embedding_dim, combiner, vocabulary, max_tokens, num_oov_indices)


# ----------------------------------------------------------------- data checks


def _is_dataset(data) -> bool:
    return hasattr(data, "element_spec") and hasattr(data, "map")


def _received_columns(columns) -> str:
    return "{" + ", ".join(f"{k!r}: {v}" for k, v in columns.items()) + "}"


def _expected(feature) -> str:
    return f"{_DTYPE_HINT[feature.dtype]} of shape {('batch', *feature.shape)}".replace("'batch'", "batch")


def _dtype_name(dtype) -> str:
    """Keras's name of a tensor or spec dtype ("string", "float32"), or its repr if Keras has none."""
    try:
        return keras.backend.standardize_dtype(dtype)
    except (TypeError, ValueError):
        return repr(dtype)


def _describe_array(array) -> str:
    if isinstance(array, np.ndarray):
        return f"array of shape {tuple(array.shape)} and dtype {array.dtype}"
    return f"tensor of shape {tuple(array.shape)} and dtype {_dtype_name(array.dtype)}"


def _describe_spec(spec) -> str:
    return f"tensor of shape {tuple(spec.shape)} and dtype {_dtype_name(spec.dtype)}"


def _as_string_tensor(array, name: str, columns: str):
    try:
        return keras.ops.convert_to_tensor(array, dtype="string")
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Feature {name!r} expects strings (str or bytes) and could not convert its column "
            f"({error}). Received: columns {columns}"
        ) from None


# ----------------------------------------------------------------- Features


@keras.saving.register_keras_serializable(package="kmtl")
class Features:
    """The model's raw tabular inputs and their encodings (a plain config object).

    Pass it to `kmtl.build_model(features=...)`. Feature order is the order
    of the encoder's output vector.

    Args:
        features: a non-empty list of features made by `categorical`,
            `hashed`, `numeric`, `bucketized` and `multi_categorical`, with
            unique names.

    Raises:
        ValueError: for an empty list, an item that is not a feature, or
            repeated names.

    Example:

    >>> from kmtl import inputs
    >>> spec = inputs.Features([inputs.hashed("zip", 16, 4), inputs.numeric("age", 40.0, 100.0)])
    >>> spec.input_specs()
    {'zip': ((), 'string'), 'age': ((), 'float32')}
    """

    def __init__(self, features: Sequence[Feature]):
        if isinstance(features, Feature) or not hasattr(features, "__iter__"):
            raise ValueError(f"`features` must be a list of features. Received: features={features!r}")
        features = list(features)
        bad = [f for f in features if not isinstance(f, Feature)]
        if not features or bad:
            raise ValueError(
                "`features` must be a non-empty list of kmtl.inputs features (categorical, hashed, "
                f"numeric, bucketized, multi_categorical). Received: features={features!r}"
            )
        names = [f.name for f in features]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"Feature names must be unique; repeated: {repeated}. Received: names={names}")
        self.features = features

    # --- structure ---------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The feature names, in order."""
        return [f.name for f in self.features]

    @property
    def adapted(self) -> bool:
        """Whether every feature has its state (given or computed by `adapt`)."""
        return all(f.adapted for f in self.features)

    @property
    def output_dim(self) -> int:
        """Width of the encoded vector: the sum of the features' encoding widths."""
        return sum(f.output_dim for f in self.features)

    def input_specs(self) -> dict:
        """`{name: (shape without batch dimension, dtype)}` of the raw model inputs."""
        return {f.name: (f.shape, f.dtype) for f in self.features}

    def __iter__(self):
        return iter(self.features)

    def __len__(self):
        return len(self.features)

    def __getitem__(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"No feature {name!r}. Features: {self.names}")

    # --- adaptation --------------------------------------------------------------
    def adapt(self, data) -> Features:
        """Computes every feature's state that was not given, from data.

        Runs the Keras layers' own `adapt` (`StringLookup`, `IntegerLookup`,
        `Normalization`, `Discretization`), one pass over the data per
        feature to adapt, and stores what they learned (vocabularies, mean
        and variance, bin boundaries). Adapting again recomputes that state;
        given values are kept. Nothing changes if adapting any feature fails.

        Args:
            data: a dict `{name: array}` (1-D arrays, `[n, width]` for
                multi_categorical features; other columns are ignored), or a
                `tf.data.Dataset` yielding such dicts or `(dict, labels[,
                weights])` tuples, batched or not.

        Returns:
            self.

        Raises:
            ValueError: if a column is missing, has the wrong dtype or shape
                (the message names the feature and the columns received),
                numbers are not finite, or data is of another type.
        """
        # Adapt copies, then commit: a failure leaves every feature as it was.
        pending = [Feature.from_config(f.get_config()) for f in self.features if f.needs_adapt]
        if _is_dataset(data):
            batched = self._check_dataset(data, context="adapt", exact=False)
            dataset = data if batched else data.batch(_ADAPT_BATCH)
            for feature in pending:
                if feature.dtype == "float32":
                    # [batch, 1] floats: Keras's Normalization would batch a rank-1 dataset again.
                    column = dataset.map(
                        lambda *element, name=feature.name: keras.ops.reshape(
                            keras.ops.cast(element[0][name], "float32"), (-1, 1)
                        )
                    )
                else:
                    column = dataset.map(lambda *element, name=feature.name: element[0][name])
                feature.adapt(column)
        elif isinstance(data, dict):
            columns = self._check_arrays(data, context="adapt", exact=False)
            for feature in pending:
                column = columns[feature.name]
                if feature.dtype == "string" and isinstance(column, np.ndarray):
                    received = _received_columns({k: _describe_array(v) for k, v in columns.items()})
                    column = _as_string_tensor(column, feature.name, received)
                elif feature.dtype == "float32":
                    column = np.asarray(column, dtype="float32")
                    if not np.all(np.isfinite(column)):
                        raise ValueError(
                            f"Feature {feature.name!r}: adapt needs finite numbers. Received: a column "
                            f"with {int(np.sum(~np.isfinite(column)))} NaN or infinite value(s)"
                        )
                feature.adapt(column)
        else:
            raise ValueError(
                "`adapt` takes a dict {feature name: array} or a tf.data.Dataset of such dicts (or of "
                f"(dict, labels) tuples). Received: data of type {type(data).__name__}"
            )
        for adapted in pending:
            self[adapted.name].state = adapted.state
        return self

    def check_adapted(self, context: str = "Features") -> None:
        """Raises unless every feature has its state.

        Raises:
            ValueError: naming the features that need `adapt`.
        """
        missing = [f.name for f in self.features if not f.adapted]
        if missing:
            raise ValueError(
                f"{context}: feature(s) {missing} need data to compute their vocabulary, mean and variance "
                f"or bin boundaries: call `features.adapt(data)` first (or give the values). "
                f"Received: an unadapted {self!r}"
            )

    # --- checks of raw inputs -----------------------------------------------------
    def _check_keys(self, keys, received: str, context: str, exact: bool) -> None:
        missing = [n for n in self.names if n not in keys]
        unknown = sorted(str(k) for k in keys if k not in self.names) if exact else []
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing column(s) {missing}")
            if unknown:
                parts.append(f"unknown feature(s) {unknown}")
            raise ValueError(
                f"{context}: the inputs must be a dict with one column per feature {self.names}: "
                f"{'; '.join(parts)}. Received: columns {received}"
            )

    def _check_arrays(self, data: dict, context: str, exact: bool = True) -> dict:
        """Checks a dict of arrays; returns `{feature: np.ndarray}` (feature columns only)."""
        # Tensors stay tensors; lists, pandas Series and other array-likes become NumPy arrays.
        columns = {k: v if keras.ops.is_tensor(v) else np.asarray(v) for k, v in data.items()}
        described = {k: _describe_array(v) for k, v in columns.items()}
        received = _received_columns(described)
        self._check_keys(columns, received, context, exact)
        lengths = {}
        for feature in self.features:
            column = columns[feature.name]
            if not isinstance(column, np.ndarray):
                ok = _dtype_name(column.dtype) in _SPEC_DTYPES[feature.dtype]
            else:
                ok = column.dtype.kind in _NUMPY_KINDS[feature.dtype]
                if ok and column.dtype.kind == "O" and column.size:
                    first = column.reshape(-1)[0]
                    ok = isinstance(first, (str, bytes)) if feature.dtype == "string" else False
            shape = tuple(column.shape)
            if not ok or len(shape) != 1 + len(feature.shape) or shape[1:] != feature.shape:
                raise ValueError(
                    f"{context}: feature {feature.name!r} expects {_expected(feature)}, got "
                    f"{described[feature.name]}. Received: columns {received}"
                )
            lengths[feature.name] = shape[0]
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"{context}: every feature column needs the same number of rows. Received: rows {lengths}"
            )
        return {f.name: columns[f.name] for f in self.features}

    def _check_dataset(self, dataset, context: str, exact: bool = True) -> bool:
        """Checks a dataset's element spec; returns whether its elements are batches."""
        spec = dataset.element_spec
        x_spec = spec[0] if isinstance(spec, tuple) and spec else spec
        if not isinstance(x_spec, dict):
            raise ValueError(
                f"{context}: a dataset for a feature model yields dicts {{feature: value}} or "
                f"(dict, labels[, weights]) tuples. Received: elements {spec!r}"
            )
        received = _received_columns({k: _describe_spec(s) for k, s in x_spec.items()})
        self._check_keys(x_spec, received, context, exact)
        batched = set()
        for feature in self.features:
            column = x_spec[feature.name]
            dtype = _dtype_name(column.dtype)
            shape = tuple(column.shape)
            rank = len(feature.shape)
            shape_ok = len(shape) in (rank, rank + 1) and shape[len(shape) - rank :] == feature.shape
            if dtype not in _SPEC_DTYPES[feature.dtype] or not shape_ok:
                raise ValueError(
                    f"{context}: feature {feature.name!r} expects {_expected(feature)}, got "
                    f"{_describe_spec(column)}. Received: columns {received}"
                )
            batched.add(len(shape) == rank + 1)
        if len(batched) > 1:
            raise ValueError(
                f"{context}: some feature columns are batched and others are not. Received: columns {received}"
            )
        return batched.pop()

    def standardize(self, x, context: str = "inputs"):
        """Checks raw model inputs against the spec and returns them ready for Keras.

        A dict of arrays must hold exactly one column per feature, with the
        feature's dtype and shape; string columns (NumPy `str`, `bytes` or
        object arrays) are converted to string tensors, which Keras's array
        adapter cannot slice as NumPy arrays. A `tf.data.Dataset` is
        checked through its element spec (batched elements) and returned
        as is. Other objects (generators, `keras.utils.PyDataset`) pass
        unchecked.

        Args:
            x: the inputs given to `fit`, `evaluate` or `predict`.
            context: what the message names (e.g. "predict").

        Returns:
            The inputs, string columns converted to tensors.

        Raises:
            ValueError: for an unknown or missing column, a wrong dtype or
                shape, rows of different lengths, an unbatched dataset, or
                a single array instead of a dict.
        """
        if x is None:
            return x
        if isinstance(x, dict):
            columns = self._check_arrays(x, context)
            received = _received_columns({k: _describe_array(v) for k, v in columns.items()})
            return {
                f.name: _as_string_tensor(columns[f.name], f.name, received)
                if f.dtype == "string" and isinstance(columns[f.name], np.ndarray)
                else columns[f.name]
                for f in self.features
            }
        if _is_dataset(x):
            if not self._check_dataset(x, context):
                raise ValueError(
                    f"{context}: the dataset yields single examples; batch it (dataset.batch(n)). "
                    f"Received: elements {x.element_spec!r}"
                )
            return x
        if isinstance(x, (np.ndarray, list, tuple)) or hasattr(x, "shape"):
            raise ValueError(
                f"{context}: a feature model takes a dict with one column per feature {self.names}. "
                f"Received: inputs of type {type(x).__name__}"
            )
        return x

    def example(self, size: int = 4, seed: int = 0) -> dict:
        """A small valid raw batch `{name: np.ndarray}` (known categories, typical numbers).

        Raises:
            ValueError: if the spec is not adapted.
        """
        self.check_adapted("example")
        rng = np.random.default_rng(seed)
        return {f.name: f.example(size, rng) for f in self.features}

    # --- config ------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"features": [f.get_config() for f in self.features]}

    @classmethod
    def from_config(cls, config):
        items = config.get("features") if isinstance(config, dict) else None
        if not isinstance(items, list):
            raise ValueError(f"A Features config is {{'features': [feature configs]}}. Received: {config!r}")
        return cls([Feature.from_config(item) for item in items])

    def __eq__(self, other):
        return isinstance(other, Features) and self.get_config() == other.get_config()

    def __repr__(self):
        return f"Features([{', '.join(repr(f) for f in self.features)}])"


def get(identifier) -> Features:
    """Returns a `Features` from a `Features`, its config, or its serialized Keras form.

    Args:
        identifier: a `Features` (returned as is), `Features.get_config()`,
            or `keras.saving.serialize_keras_object(features)`.

    Returns:
        A `Features`.

    Raises:
        ValueError: for anything else.

    Example:

    >>> spec = Features([numeric("age", 40.0, 100.0)])
    >>> get(spec.get_config()) == spec
    True
    """
    if isinstance(identifier, Features):
        return identifier
    if isinstance(identifier, dict):
        if "class_name" in identifier:
            obj = keras.saving.deserialize_keras_object(identifier)
            if isinstance(obj, Features):
                return obj
        elif "features" in identifier:
            return Features.from_config(identifier)
    raise ValueError(
        "`features` must be a kmtl.inputs.Features (or its config). Received: "
        f"features={identifier!r} of type {type(identifier).__name__}"
    )


# ----------------------------------------------------------------- the layer


@keras.saving.register_keras_serializable(package="kmtl")
class FeatureEncoder(keras.layers.Layer):
    """Maps a dict of raw feature batches to one `[batch, output_dim]` float vector.

    The concatenation, in feature order, of each feature's encoding. Its
    sublayers are built from the (adapted) spec, which is its whole config:
    loading rebuilds the lookups without data, and the embedding tables are
    its trainable weights.

    Args:
        features: an adapted `Features` (or its config).
        **kwargs: `keras.layers.Layer` arguments (e.g. `name`).

    Raises:
        ValueError: if `features` is not adapted.

    Example:

    >>> import numpy as np
    >>> from kmtl import inputs
    >>> spec = inputs.Features([inputs.categorical("c", 3, vocabulary=["a", "b"]), inputs.numeric("x", 0.0, 1.0)])
    >>> tuple(inputs.FeatureEncoder(spec)({"c": np.array(["a", "z"]), "x": np.array([1.0, 2.0])}).shape)
    (2, 4)
    """

    def __init__(self, features, **kwargs):
        super().__init__(**kwargs)
        spec = get(features)
        spec.check_adapted("FeatureEncoder")
        # A private copy: adapting the caller's spec later changes nothing here.
        self.features = Features.from_config(spec.get_config())
        # One flat dict {"<feature>_<role>": layer}: SavedModel export tracks the
        # lookup tables of layers held in a flat collection, not in nested ones.
        layers = {f.name: f.layers() for f in self.features}
        self.roles = {name: tuple(roles) for name, roles in layers.items()}
        self.feature_layers = {
            f"{name}_{role}": layer for name, roles in layers.items() for role, layer in roles.items()
        }

    def _layers_of(self, feature) -> dict:
        return {role: self.feature_layers[f"{feature.name}_{role}"] for role in self.roles[feature.name]}

    def build(self, input_shape=None):
        for layer in self.feature_layers.values():
            if not layer.built:
                layer.build(None if isinstance(layer, keras.layers.Embedding) else (None,))
        self.built = True

    def call(self, inputs):
        parts = []
        for feature in self.features:
            x = inputs[feature.name]
            if feature.dtype != "string":
                x = keras.ops.cast(x, feature.dtype)
            parts.append(keras.ops.cast(feature.encode(self._layers_of(feature), x), self.compute_dtype))
        return keras.ops.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def compute_output_shape(self, input_shape):
        first = next(iter(input_shape.values())) if isinstance(input_shape, dict) else (None,)
        return (first[0], self.features.output_dim)

    def get_config(self):
        return {**super().get_config(), "features": self.features.get_config()}


__all__ = [
    "Bucketized",
    "Categorical",
    "Feature",
    "FeatureEncoder",
    "Features",
    "Hashed",
    "MultiCategorical",
    "Numeric",
    "bucketized",
    "categorical",
    "get",
    "hashed",
    "multi_categorical",
    "numeric",
]
