"""Multi-task architectures, chosen with `kmtl.build_model(architecture=...)`.

Each module defines one builder following the contract in
`kmtl.architectures.base`: it returns a shared `encoder` model and one
`decoder` model per task, so that compile, weighting strategies, evaluation
and export work the same for every architecture.

| name           | module           | shared parameters                                   |
|----------------|------------------|-----------------------------------------------------|
| `hard_sharing` | `hard_sharing`   | the trunk (or its first `shared_depth` blocks)      |
| `mmoe`         | `mmoe`           | experts (+ stem); gates are task-specific           |
| `cgc`, `ple`   | `ple`            | shared experts, inner PLE levels (see `build_ple`)  |
| `cross_stitch` | `cross_stitch`   | every column and cross-stitch unit                  |
| `soft_sharing` | `soft_sharing`   | every task's trunk, tied by a penalty on kernels    |
| `mtan`         | `mtan`           | the conv stages of the trunk                        |
| `task_routed`  | `task_routed`    | the trunk, applied to each task's own input         |
| `esmm`         | `esmm`           | both towers (pCTCVR = pCTR x pCVR, entire space)    |

Every builder module is imported here and registers its builder
(`kmtl.registry`); `get(name)` returns the builder wrapped so that unknown option names and
options that are not plain JSON values (they are stored in the model config)
are a `ValueError` naming the architecture and its valid options.
"""

from __future__ import annotations

import functools
import inspect
import json

from kmtl import registry
from kmtl.architectures import (  # noqa: F401
    cross_stitch,
    esmm,
    hard_sharing,
    layers,
    mmoe,
    mtan,
    ple,
    soft_sharing,
    task_routed,
)
from kmtl.architectures.base import Parts, decoder_inputs
from kmtl.architectures.inspection import expert_labels, expert_utilization
from kmtl.architectures.task_routed import task_inputs, task_submodel

_ORDER = ("hard_sharing", "mmoe", "cgc", "ple", "cross_stitch", "mtan", "task_routed", "esmm", "soft_sharing")


def names() -> list[str]:
    """Returns the known architecture names."""
    registered = registry.names("architecture")
    return [n for n in _ORDER if n in registered] + sorted(set(registered) - set(_ORDER))


def options(name: str) -> dict:
    """Returns `{option: default}` of an architecture's builder.

    >>> options("mmoe")
    {'num_experts': 4, 'gate_input': 'input'}
    """
    builder = _builder(name)
    parameters = list(inspect.signature(builder).parameters.values())[3:]
    return {p.name: p.default for p in parameters}


def _builder(name):
    if name not in names():
        raise ValueError(
            f"Unknown architecture {name!r}. Known architectures: {', '.join(names())}. "
            f"Received: architecture={name!r}"
        )
    return registry.lookup("architecture", name)


def get(name: str):
    """Returns the builder function of an architecture, with option checks.

    Raises:
        ValueError: for an unknown name; calling the builder raises
            ValueError for unknown options or options that are not plain
            JSON values.
    """
    builder = _builder(name)
    valid = options(name)

    @functools.wraps(builder)
    def build(inputs, trunk, heads, **kwargs):
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            listed = ", ".join(valid) if valid else "none"
            raise ValueError(
                f"Architecture {name!r} has no option(s) {unknown}. Valid options: {listed}. "
                f"Received: {', '.join(f'{k}={kwargs[k]!r}' for k in unknown)}"
            )
        try:
            json.dumps(kwargs)
        except (TypeError, ValueError):
            raise ValueError(
                f"Architecture options are stored in the model config and must be plain JSON "
                f"values (numbers, strings, lists, dicts). Received: {kwargs!r}"
            ) from None
        return builder(inputs, trunk, heads, **kwargs)

    return build


__all__ = [
    "Parts",
    "decoder_inputs",
    "expert_labels",
    "expert_utilization",
    "get",
    "names",
    "options",
    "task_inputs",
    "task_submodel",
]
