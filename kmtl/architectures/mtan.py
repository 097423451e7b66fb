"""Multi-Task Attention Network (MTAN) for conv trunks."""

from __future__ import annotations

import keras

from kmtl.architectures import _common
from kmtl.architectures.base import Parts
from kmtl.architectures.layers import TaskAttention
from kmtl.registry import register


@register("architecture", "mtan")
def build_mtan(inputs, trunk, heads) -> Parts:
    """A shared conv trunk with one attention module per task and conv stage.

    The encoder is the trunk's conv stages; it outputs the list of every
    stage's features. Each task's decoder runs a chain of `TaskAttention`
    modules (`<task>_attention_<j>`): the module at stage `j` computes a
    sigmoid mask from the shared stage-`j` features (and the task's
    attended features of stage `j-1`, pooled to the same resolution) and
    multiplies it into the shared features. The task's attended features of
    the last conv stage then pass through a task-specific copy of the
    trunk's dense stages (`<task>_tower_*`) and the head. See
    `kmtl.architectures.layers.TaskAttention` for how this simplifies the
    paper's attention module.

    Shared parameters: the trunk's conv stages. Task-specific: each task's
    attention modules, its copy of the trunk's dense stages and its head.
    Every decoder reads all stage features, so `supports_representation`
    is True.

    Args:
        inputs: a single image `keras.Input` (height, width, channels).
        trunk: a conv `kmtl.trunks.Trunk` (e.g. `trunks.conv()`).
        heads: list of `kmtl.heads.Head`.

    Returns:
        A `Parts`.

    Raises:
        ValueError: for a dense trunk, a non-image input or a dict of inputs.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Binary("parity")],
    ...     trunk=trunks.conv((8, 16), (32,)), input_shape=(28, 28, 1), architecture="mtan")
    >>> sorted(model.output_names)
    ['digit', 'parity']

    References:
        Liu, S., Johns, E. & Davison, A. J. (2019). End-to-End Multi-Task
        Learning with Attention. CVPR.
    """
    # === Config ===
    _common.single_input(inputs, "mtan")
    if trunk.kind != "conv" or trunk.num_conv_stages < 1:
        raise ValueError(
            "mtan attends over conv feature maps and needs a conv trunk (e.g. "
            f"kmtl.trunks.conv()). Received: trunk={trunk!r}"
        )
    _common.check_trunk_input(trunk, inputs, "mtan")
    num_conv = trunk.num_conv_stages

    # === Encoder: shared conv stages ===
    stages, x = [], inputs
    for block in trunk.stages("shared")[:num_conv]:
        x = block(x)
        stages.append(x)
    # Every stage but the last feeds the next one: hand the decoders copies (see _common.branch).
    stages = [_common.branch(f, f"stage_{j}_branch") for j, f in enumerate(stages[:-1])] + stages[-1:]
    encoder = keras.Model(inputs, stages, name="encoder")

    # === Decoders: attention chain, task tower, head ===
    decoders = {}
    for head in heads:
        t = head.name
        rep = _common.representation_inputs(stages, t)
        attended = TaskAttention(trunk.filters[0], name=f"{t}_attention_0")(rep[0])
        for j in range(1, num_conv):
            attended = TaskAttention(trunk.filters[j], name=f"{t}_attention_{j}")([rep[j], attended])
        features = _common.apply(trunk.stages(f"{t}_tower")[num_conv:], attended)
        decoders[t] = keras.Model(rep, head(features), name=t)
    return Parts(
        encoder=encoder,
        decoders=decoders,
        supports_representation=True,
        shared_description="the trunk's conv stages; attention modules, dense stages and heads are task-specific",
    )
