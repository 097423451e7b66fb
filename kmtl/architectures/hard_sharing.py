"""Hard parameter sharing: one shared trunk, one head per task."""

from __future__ import annotations

import keras

from kmtl.architectures.base import Parts, decoder_inputs
from kmtl.registry import register


@register("architecture", "hard_sharing")
def build_hard_sharing(inputs, trunk, heads) -> Parts:
    """One trunk shared by all tasks, then each task's head.

    Shared parameters: all trunk variables. Task-specific: each head's tower
    and output layer.

    Args:
        inputs: a `keras.Input` (single input).
        trunk: a `kmtl.trunks.Trunk`.
        heads: list of `kmtl.heads.Head`.

    Raises:
        ValueError: if `inputs` is a dict (use `architecture="task_routed"`
            for tasks with different inputs).
    """
    if isinstance(inputs, dict):
        raise ValueError(
            "hard_sharing takes one input; for tasks with different inputs use "
            f"architecture='task_routed'. Received: inputs with keys {sorted(inputs)}"
        )
    if trunk.kind == "conv" and len(inputs.shape) != 4:
        raise ValueError(
            "A conv trunk needs image inputs of shape (batch, height, width, "
            f"channels). Received: input shape {tuple(inputs.shape)}"
        )
    stages = trunk.stages("trunk")
    features = inputs
    for stage in stages:
        features = stage(features)
    encoder = keras.Model(inputs, features, name="encoder")
    decoders = {}
    for head in heads:
        rep = decoder_inputs(features, head.name)
        decoders[head.name] = keras.Model(rep, head(rep), name=head.name)
    return Parts(
        encoder=encoder,
        decoders=decoders,
        supports_representation=True,
        shared_description="all trunk variables",
        stages=stages,
    )
