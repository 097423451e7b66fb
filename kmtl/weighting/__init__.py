"""Loss weighting and gradient aggregation strategies for multi-task training.

Use a strategy by name or as an object when compiling a kmtl model::

    model.compile(optimizer="adam", weighting="pcgrad")
    model.compile(optimizer="adam", weighting=kmtl.weighting.CAGrad(c=0.4))

`get(name)` returns a new strategy from its registered name and `names()`
lists the names. Every strategy also offers the pure function
`aggregate(G)` (`[num_tasks, dim]` -> `[dim]`). See `kmtl.weighting.base` for
the contract every strategy follows.

Every strategy module is imported here, eagerly: importing `kmtl` registers
every class a saved model may name, in any process.
"""

from __future__ import annotations

from kmtl import registry
from kmtl.weighting.aligned_mtl import AlignedMTL
from kmtl.weighting.base import Weighting
from kmtl.weighting.cagrad import CAGrad
from kmtl.weighting.db_mtl import DBMTL
from kmtl.weighting.dwa import DWA
from kmtl.weighting.famo import FAMO
from kmtl.weighting.gls import GLS
from kmtl.weighting.graddrop import GradDrop
from kmtl.weighting.gradnorm import GradNorm
from kmtl.weighting.gradvac import GradVac
from kmtl.weighting.imtl import IMTL
from kmtl.weighting.mgda import MGDA
from kmtl.weighting.nash_mtl import NashMTL
from kmtl.weighting.pcgrad import PCGrad
from kmtl.weighting.rlw import RLW
from kmtl.weighting.static import Equal, Static
from kmtl.weighting.uncertainty import Uncertainty
from kmtl.weighting.upgrad import UPGrad

#: The order `names()` lists the strategies in: loss level, then gradient level.
_ORDER = (
    "equal",
    "uncertainty",
    "dwa",
    "gradnorm",
    "rlw",
    "famo",
    "db_mtl",
    "gls",
    "pcgrad",
    "cagrad",
    "mgda",
    "imtl",
    "gradvac",
    "nash_mtl",
    "aligned_mtl",
    "upgrad",
    "graddrop",
)


def names() -> list[str]:
    """Returns the registered strategy names, in a stable order."""
    registered = registry.names("weighting")
    return [n for n in _ORDER if n in registered] + sorted(set(registered) - set(_ORDER))


def get(identifier, **kwargs) -> Weighting:
    """Returns a weighting strategy.

    Args:
        identifier: a registered name (see `names()`; `-` and `_` are the
            same, case is ignored), a `Weighting` instance (returned as is),
            or a serialized config dict.
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
        if key not in names():
            raise ValueError(
                f"Unknown weighting strategy {identifier!r}. Known strategies: "
                f"{', '.join(names())}. Received: weighting={identifier!r}"
            )
        return registry.lookup("weighting", key)(**kwargs)
    raise ValueError(
        "`weighting` must be a strategy name, a kmtl.weighting.Weighting or a "
        f"config dict. Received: weighting={identifier!r} of type {type(identifier).__name__}"
    )


__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTL",
    "MGDA",
    "RLW",
    "AlignedMTL",
    "CAGrad",
    "Equal",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "NashMTL",
    "PCGrad",
    "Static",
    "UPGrad",
    "Uncertainty",
    "Weighting",
    "get",
    "names",
]
