"""Multi-gate Mixture-of-Experts (MMoE)."""

from __future__ import annotations

import keras

from kmtl.architectures import _common
from kmtl.architectures.base import Parts
from kmtl.architectures.layers import ExpertGate, ExpertMixture
from kmtl.registry import register

GATE_INPUTS = ("input", "stem")


@register("architecture", "mmoe")
def build_mmoe(inputs, trunk, heads, num_experts: int = 4, gate_input: str = "input") -> Parts:
    """MMoE: `num_experts` expert trunks mixed by one softmax gate per task.

    Each expert is a fresh copy of the trunk. Task `t`'s gate reads the
    flattened input (`gate_input="input"`, as in the paper) or the flattened
    output of a shared stem (`gate_input="stem"`: the trunk's first stage is
    shared once, experts are copies of the remaining stages and read the
    stem's output). The gate's softmax weights mix the experts' outputs and
    the mixture feeds the task's head.

    Split: the encoder outputs `{"gate_input": ..., "expert_0": ..., ...}`;
    each decoder is the task's gate (`<task>_gate`), mixture and head.

    Shared parameters: all experts and the stem. Task-specific: each task's
    gate and head. The representation holds everything the gates read, so
    every decoder reads the whole representation; with `gate_input="stem"`
    `supports_representation` is True. With `gate_input="input"` it is False:
    the representation then contains the raw input, whose gradients no
    shared parameter receives and which would distort the Gram matrix of a
    representation-level strategy (parameter mode works).

    Args:
        inputs: a single `keras.Input`.
        trunk: a `kmtl.trunks.Trunk` (dense or conv) copied for each expert.
        heads: list of `kmtl.heads.Head`.
        num_experts: number of experts (>= 1).
        gate_input: `"input"` or `"stem"` (see above).

    Returns:
        A `Parts`.

    Raises:
        ValueError: for `num_experts < 1`, an unknown `gate_input`, a dict
            of inputs, or `gate_input="stem"` with a one-stage trunk.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Binary("parity")],
    ...     trunk=trunks.dense((32,)), input_shape=(8, 8, 1),
    ...     architecture="mmoe", num_experts=3)
    >>> sorted(model.output_names)
    ['digit', 'parity']

    References:
        Ma, J., Zhao, Z., Yi, X., Chen, J., Hong, L. & Chi, E. H. (2018).
        Modeling Task Relationships in Multi-task Learning with Multi-gate
        Mixture-of-Experts. KDD.
    """
    # === Config ===
    _common.single_input(inputs, "mmoe")
    num_experts = _common.positive_int(num_experts, "num_experts", "mmoe")
    gate_input = _common.choice(gate_input, "gate_input", GATE_INPUTS, "mmoe")
    _common.check_trunk_input(trunk, inputs, "mmoe")

    # === Layers and encoder ===
    stem, first_stage = _common.stem_and_stages(trunk, gate_input, "mmoe")
    base = _common.apply(stem, inputs)
    num_stages = len(trunk.stages("probe"))
    representation = {"gate_input": _common.branch(base, "gate_input_branch") if stem else base}
    for i in range(num_experts):
        representation[f"expert_{i}"] = _common.expert(trunk, f"expert_{i}", first_stage, num_stages, base)
    encoder = keras.Model(inputs, representation, name="encoder")

    # === Decoders ===
    decoders = {}
    for head in heads:
        rep = _common.representation_inputs(representation, head.name)
        gate = ExpertGate(num_experts, name=f"{head.name}_gate")(rep["gate_input"])
        experts = [rep[f"expert_{i}"] for i in range(num_experts)]
        mixed = ExpertMixture(name=f"{head.name}_mixture")([gate] + experts)
        decoders[head.name] = keras.Model(rep, head(mixed), name=head.name)
    return Parts(
        encoder=encoder,
        decoders=decoders,
        supports_representation=gate_input == "stem",
        shared_description="all experts (and the stem); gates and heads are task-specific",
    )
