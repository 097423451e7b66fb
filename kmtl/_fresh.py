"""`fresh`: a new copy of a compile argument, so that no two models share its state."""

from __future__ import annotations

import keras


def fresh(value):
    """A new optimizer (or weighting strategy, or other Keras object) equal to `value`.

    Searches and reports compile many models from one set of compile options; an
    optimizer or strategy instance holds state (slots, iterations, weights) and must not
    be shared. Other values (names, dicts, numbers) are returned as they are.
    """
    if isinstance(value, keras.optimizers.Optimizer):
        return keras.optimizers.deserialize(keras.optimizers.serialize(value))
    if hasattr(value, "get_config") and hasattr(type(value), "from_config"):
        return type(value).from_config(value.get_config())
    return value
