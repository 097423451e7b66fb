"""Multi-task architectures, chosen with `kmtl.build_model(architecture=...)`.

Each module defines one builder following the contract in
`kmtl.architectures.base`: it returns a shared `encoder` model and one
`decoder` model per task, so that compile, weighting strategies, evaluation
and export work the same for every architecture.
"""

from __future__ import annotations

import importlib

from kmtl.architectures.base import Parts, decoder_inputs

# architecture name -> (module, builder function)
_BUILDERS = {
    "hard_sharing": ("hard_sharing", "build_hard_sharing"),
}


def names() -> list[str]:
    """Returns the known architecture names."""
    return list(_BUILDERS)


def get(name: str):
    """Returns the builder function of an architecture.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in _BUILDERS:
        raise ValueError(
            f"Unknown architecture {name!r}. Known architectures: {', '.join(_BUILDERS)}. "
            f"Received: architecture={name!r}"
        )
    module, function = _BUILDERS[name]
    return getattr(importlib.import_module(f"kmtl.architectures.{module}"), function)


__all__ = ["Parts", "decoder_inputs", "get", "names"]
