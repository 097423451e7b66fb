"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE).

PLE stacks `num_levels` CGC levels; CGC is PLE with one level.

At every level there are `num_shared_experts` shared experts and
`num_task_experts` experts per task. Task `t`'s gate mixes the shared
experts and `t`'s own experts (in that order); between levels a shared gate
mixes the shared experts and every task's experts into the input of the next
level's shared experts. Experts are copies of a slice of the trunk: the
trunk's stages are split into `num_levels` consecutive groups (earlier levels
take the remainder), so PLE needs at least `num_levels` trunk stages. Gates
read the flattened input of their level (level 0: the model input, or a
shared stem's output with `gate_input="stem"`, as in `build_mmoe`).

Split of the parameters (encoder = shared, decoders = task-specific):

* Encoder: the stem, every inner level (its shared experts, task experts,
  task gates and shared gate) and the shared experts of the last level. The
  inner task experts and gates feed the shared gate and thus every task's
  output, so they are shared in the gradient sense: each task's loss
  depends on them.
* Decoder of task `t`: the last level's task experts of `t`, the gate
  `<task>_gate` and the head; they affect task `t` only.

The encoder outputs `{"shared_expert_i": ..., "<task>_input": ...}` (one
input per task from the previous level; a single `"input"` for one level).
`supports_representation` is False only for CGC with `gate_input="input"`,
whose representation is then the raw model input (see `build_mmoe`).

References:
    Tang, H., Liu, J., Zhao, M. & Gong, X. (2020). Progressive Layered
    Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
    Personalized Recommendations. RecSys.
"""

from __future__ import annotations

import keras

from kmtl.architectures import _common
from kmtl.architectures.base import Parts
from kmtl.architectures.layers import ExpertGate, ExpertMixture
from kmtl.registry import register

GATE_INPUTS = ("input", "stem")


def _experts(trunk, prefix, count, bounds, x):
    return [_common.expert(trunk, f"{prefix}_{i}", *bounds, x) for i in range(count)]


@register("architecture", "ple")
def build_ple(
    inputs,
    trunk,
    heads,
    num_levels: int = 2,
    num_shared_experts: int = 2,
    num_task_experts: int = 1,
    gate_input: str = "input",
) -> Parts:
    """PLE: `num_levels` stacked CGC levels (see the module docstring).

    Args:
        inputs: a single `keras.Input`.
        trunk: a `kmtl.trunks.Trunk` with at least `num_levels` stages (one
            more with `gate_input="stem"`).
        heads: list of `kmtl.heads.Head`.
        num_levels: number of extraction levels (>= 1).
        num_shared_experts: shared experts per level (>= 1).
        num_task_experts: experts per task and level (>= 1).
        gate_input: `"input"` or `"stem"`.

    Returns:
        A `Parts`.

    Raises:
        ValueError: for counts < 1, an unknown `gate_input`, a dict of
            inputs, or a trunk with fewer stages than levels.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Binary("parity")],
    ...     trunk=trunks.dense((32, 16)), input_shape=(8, 8, 1),
    ...     architecture="ple", num_levels=2)
    >>> sorted(model.output_names)
    ['digit', 'parity']
    """
    return _build(inputs, trunk, heads, num_levels, num_shared_experts, num_task_experts, gate_input, "ple")


@register("architecture", "cgc")
def build_cgc(
    inputs,
    trunk,
    heads,
    num_shared_experts: int = 2,
    num_task_experts: int = 1,
    gate_input: str = "input",
) -> Parts:
    """CGC: shared and task-specific expert trunks, one gate per task.

    PLE with one level (see the module docstring): each expert is a copy of
    the whole trunk (of the stages after the stem with `gate_input="stem"`).
    Shared: the shared experts (and stem). Task-specific: each task's
    experts, gate and head.

    Args:
        inputs: a single `keras.Input`.
        trunk: a `kmtl.trunks.Trunk`.
        heads: list of `kmtl.heads.Head`.
        num_shared_experts: shared experts (>= 1).
        num_task_experts: experts per task (>= 1).
        gate_input: `"input"` or `"stem"`.

    Returns:
        A `Parts`.

    Raises:
        ValueError: for counts < 1, an unknown `gate_input` or a dict of inputs.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Binary("parity")],
    ...     trunk=trunks.dense((32,)), input_shape=(8, 8, 1), architecture="cgc")
    >>> sorted(model.output_names)
    ['digit', 'parity']
    """
    return _build(inputs, trunk, heads, 1, num_shared_experts, num_task_experts, gate_input, "cgc")


def _build(inputs, trunk, heads, num_levels, num_shared, num_task, gate_input, architecture) -> Parts:
    # === Config ===
    _common.single_input(inputs, architecture)
    num_levels = _common.positive_int(num_levels, "num_levels", architecture)
    num_shared = _common.positive_int(num_shared, "num_shared_experts", architecture)
    num_task = _common.positive_int(num_task, "num_task_experts", architecture)
    gate_input = _common.choice(gate_input, "gate_input", GATE_INPUTS, architecture)
    _common.check_trunk_input(trunk, inputs, architecture)
    stem, first_stage = _common.stem_and_stages(trunk, gate_input, architecture)
    num_stages = len(trunk.stages("probe")) - first_stage
    if num_stages < num_levels:
        raise ValueError(
            f"{architecture}: each level's experts are a slice of the trunk, so the trunk needs at "
            f"least num_levels={num_levels} stages{' after the stem' if stem else ''}. "
            f"Received: {num_stages} stage(s) in {trunk!r}"
        )
    bounds = [(first_stage + a, first_stage + b) for a, b in _common.stage_groups(num_stages, num_levels)]
    names = [h.name for h in heads]

    # === Encoder: stem, inner levels, last-level shared experts ===
    base = _common.apply(stem, inputs)
    shared_in, task_in = base, {t: base for t in names}
    for level in range(num_levels - 1):
        shared = _experts(trunk, f"level_{level}_shared_expert", num_shared, bounds[level], shared_in)
        own = {
            t: _experts(trunk, f"level_{level}_{t}_expert", num_task, bounds[level], task_in[t])
            for t in names
        }
        next_task_in = {}
        for t in names:
            gate = ExpertGate(num_shared + num_task, name=f"level_{level}_{t}_gate")(task_in[t])
            next_task_in[t] = ExpertMixture(name=f"level_{level}_{t}_mixture")([gate] + shared + own[t])
        every = shared + [e for t in names for e in own[t]]
        gate = ExpertGate(len(every), name=f"level_{level}_shared_gate")(shared_in)
        shared_in = ExpertMixture(name=f"level_{level}_shared_mixture")([gate] + every)
        task_in = next_task_in
    last = num_levels - 1
    representation = {}
    for i, e in enumerate(
        _experts(trunk, f"level_{last}_shared_expert", num_shared, bounds[last], shared_in)
    ):
        representation[f"shared_expert_{i}"] = e
    if num_levels == 1:
        representation["input"] = _common.branch(base, "input_branch") if stem else base
    else:
        representation.update({f"{t}_input": task_in[t] for t in names})
    encoder = keras.Model(inputs, representation, name="encoder")

    # === Decoders: last-level task experts, task gate, head ===
    decoders = {}
    for head in heads:
        t = head.name
        rep = _common.representation_inputs(representation, t)
        x = rep["input"] if num_levels == 1 else rep[f"{t}_input"]
        own = _experts(trunk, f"level_{last}_{t}_expert", num_task, bounds[last], x)
        shared = [rep[f"shared_expert_{i}"] for i in range(num_shared)]
        gate = ExpertGate(num_shared + num_task, name=f"{t}_gate")(x)
        mixed = ExpertMixture(name=f"{t}_mixture")([gate] + shared + own)
        decoders[t] = keras.Model(rep, head(mixed), name=t)
    return Parts(
        encoder=encoder,
        decoders=decoders,
        supports_representation=not (num_levels == 1 and gate_input == "input"),
        shared_description=(
            "shared experts, the stem and every inner level (task experts and gates included); "
            "the last level's task experts and gates are task-specific"
        ),
    )
