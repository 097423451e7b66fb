"""Multi-task architectures, chosen with `kmtl.build_model(architecture=...)`.

Each module defines one builder following the contract in
`kmtl.architectures.base`: it returns a shared `encoder` model and one
`decoder` model per task, so that compile, weighting strategies, evaluation
and export work the same for every architecture.

| name           | module           | shared parameters                                   |
|----------------|------------------|-----------------------------------------------------|
| `hard_sharing` | `hard_sharing`   | the trunk                                           |
| `mmoe`         | `mmoe`           | experts (+ stem); gates are task-specific           |
| `cgc`, `ple`   | `ple`            | shared experts, inner PLE levels (see `build_ple`)  |
| `cross_stitch` | `cross_stitch`   | every column and cross-stitch unit                  |
| `mtan`         | `mtan`           | the conv stages of the trunk                        |
| `task_routed`  | `task_routed`    | the trunk, applied to each task's own input         |

`get(name)` returns the builder wrapped so that unknown option names and
options that are not plain JSON values (they are stored in the model config)
are a `ValueError` naming the architecture and its valid options.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json

from kmtl.architectures.base import Parts, decoder_inputs
from kmtl.architectures.inspection import expert_labels, expert_utilization
from kmtl.architectures.task_routed import task_inputs, task_submodel

# architecture name -> (module, builder function)
_BUILDERS = {
    "hard_sharing": ("hard_sharing", "build_hard_sharing"),
    "mmoe": ("mmoe", "build_mmoe"),
    "cgc": ("ple", "build_cgc"),
    "ple": ("ple", "build_ple"),
    "cross_stitch": ("cross_stitch", "build_cross_stitch"),
    "mtan": ("mtan", "build_mtan"),
    "task_routed": ("task_routed", "build_task_routed"),
}


def names() -> list[str]:
    """Returns the known architecture names."""
    return list(_BUILDERS)


def options(name: str) -> dict:
    """Returns `{option: default}` of an architecture's builder.

    >>> options("mmoe")
    {'num_experts': 4, 'gate_input': 'input'}
    """
    builder = _builder(name)
    parameters = list(inspect.signature(builder).parameters.values())[3:]
    return {p.name: p.default for p in parameters}


def _builder(name):
    if name not in _BUILDERS:
        raise ValueError(
            f"Unknown architecture {name!r}. Known architectures: {', '.join(_BUILDERS)}. "
            f"Received: architecture={name!r}"
        )
    module, function = _BUILDERS[name]
    return getattr(importlib.import_module(f"kmtl.architectures.{module}"), function)


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
