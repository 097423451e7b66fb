"""Loss weighting and gradient aggregation strategies for multi-task training.

Use a strategy by name or as an object when compiling a kmtl model::

    model.compile(optimizer="adam", weighting="pcgrad")
    model.compile(optimizer="adam", weighting=kmtl.weighting.CAGrad(c=0.4))

`get(name)` returns a new strategy from its registered name and `names()`
lists the names. Every gradient-level strategy also offers the pure function
`aggregate(G)` (`[num_tasks, dim]` -> `[dim]`). See `kmtl.weighting.base` for
the contract every strategy follows.
"""

from __future__ import annotations

import importlib

from kmtl.weighting.base import Weighting

# registered name -> (module, class). One module per strategy.
_REGISTRY = {
    "equal": ("static", "Equal"),
    "uncertainty": ("uncertainty", "Uncertainty"),
    "dwa": ("dwa", "DWA"),
    "gradnorm": ("gradnorm", "GradNorm"),
    "rlw": ("rlw", "RLW"),
    "famo": ("famo", "FAMO"),
    "db_mtl": ("db_mtl", "DBMTL"),
    "gls": ("gls", "GLS"),
    "pcgrad": ("pcgrad", "PCGrad"),
    "cagrad": ("cagrad", "CAGrad"),
    "mgda": ("mgda", "MGDA"),
    "imtl": ("imtl", "IMTL"),
    "gradvac": ("gradvac", "GradVac"),
    "nash_mtl": ("nash_mtl", "NashMTL"),
    "aligned_mtl": ("aligned_mtl", "AlignedMTL"),
    "upgrad": ("upgrad", "UPGrad"),
    "graddrop": ("graddrop", "GradDrop"),
}
_EXTRA_CLASSES = {"Static": "static"}


def _class(module: str, name: str):
    return getattr(importlib.import_module(f"kmtl.weighting.{module}"), name)


def names() -> list[str]:
    """Returns the registered strategy names, in a stable order."""
    return list(_REGISTRY)


def get(identifier, **kwargs) -> Weighting:
    """Returns a weighting strategy.

    Args:
        identifier: a registered name (see `names()`), a `Weighting`
            instance (returned as is), or a serialized config dict.
        **kwargs: constructor arguments when `identifier` is a name.

    Raises:
        ValueError: for an unknown name or an unsupported identifier.
    """
    if isinstance(identifier, Weighting):
        if kwargs:
            raise ValueError(
                "Keyword arguments are only accepted with a strategy name. "
                f"Received: {type(identifier).__name__} instance and {kwargs}"
            )
        return identifier
    if isinstance(identifier, dict):
        import keras

        obj = keras.saving.deserialize_keras_object(identifier)
        if not isinstance(obj, Weighting):
            raise ValueError(f"Config does not describe a Weighting. Received: {identifier}")
        return obj
    if isinstance(identifier, str):
        key = identifier.lower().replace("-", "_")
        if key not in _REGISTRY:
            raise ValueError(
                f"Unknown weighting strategy {identifier!r}. Known strategies: "
                f"{', '.join(_REGISTRY)}. Received: weighting={identifier!r}"
            )
        return _class(*_REGISTRY[key])(**kwargs)
    raise ValueError(
        "`weighting` must be a strategy name, a kmtl.weighting.Weighting or a "
        f"config dict. Received: weighting={identifier!r} of type {type(identifier).__name__}"
    )


def __getattr__(attr):
    # Class access such as kmtl.weighting.PCGrad.
    for module, cls in _REGISTRY.values():
        if cls == attr:
            return _class(module, cls)
    if attr in _EXTRA_CLASSES:
        return _class(_EXTRA_CLASSES[attr], attr)
    raise AttributeError(f"module 'kmtl.weighting' has no attribute {attr!r}")


__all__ = ["Weighting", "get", "names"] + [cls for _, cls in _REGISTRY.values()] + list(_EXTRA_CLASSES)
