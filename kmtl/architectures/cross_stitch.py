"""Cross-stitch networks: one trunk column per task, mixed after every stage."""

from __future__ import annotations

import keras

from kmtl.architectures import _common
from kmtl.architectures.base import Parts
from kmtl.architectures.layers import CrossStitch
from kmtl.registry import register


@register("architecture", "cross_stitch")
def build_cross_stitch(inputs, trunk, heads, self_weight: float = 0.9) -> Parts:
    """One copy of the trunk per task, with cross-stitch units between stages.

    Every task has its own column (a fresh copy of the trunk, built stage by
    stage with `trunk.stages()`). After each stage, including the last, a
    `CrossStitch` unit replaces each column's features by a learned linear
    mix of all columns' features (initialised to `self_weight` for a task's
    own column and `(1 - self_weight) / (T - 1)` for the others). Each head
    reads its own column's final features.

    Shared parameters: all columns and all cross-stitch units. Through the
    units every column influences every task's loss, so all of them are
    shared in the gradient sense (gradient-level strategies combine the
    per-task gradients of every column). Task-specific: the heads.
    `supports_representation` is False: each decoder reads only its own
    column, not a single shared representation.

    Args:
        inputs: a single `keras.Input`.
        trunk: a `kmtl.trunks.Trunk` (dense or conv).
        heads: list of at least two `kmtl.heads.Head`.
        self_weight: initial diagonal of the cross-stitch matrices, in (0, 1].

    Returns:
        A `Parts` whose encoder outputs `{task: features}`.

    Raises:
        ValueError: for fewer than two heads, a dict of inputs or a bad
            `self_weight`.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Binary("parity")],
    ...     trunk=trunks.dense((32,)), input_shape=(8, 8, 1), architecture="cross_stitch")
    >>> sorted(model.output_names)
    ['digit', 'parity']

    References:
        Misra, I., Shrivastava, A., Gupta, A. & Hebert, M. (2016).
        Cross-stitch Networks for Multi-task Learning. CVPR.
    """
    # === Config ===
    _common.single_input(inputs, "cross_stitch")
    if len(heads) < 2:
        raise ValueError(
            f"cross_stitch mixes the columns of two or more tasks. Received: heads={[h.name for h in heads]}"
        )
    if isinstance(self_weight, bool) or not isinstance(self_weight, (int, float)) or not 0 < self_weight <= 1:
        raise ValueError(
            f"cross_stitch: `self_weight` must be in (0, 1]. Received: self_weight={self_weight!r}"
        )
    _common.check_trunk_input(trunk, inputs, "cross_stitch")
    names = [h.name for h in heads]

    # === Encoder: columns and cross-stitch units ===
    columns = {t: trunk.stages(f"{t}_column") for t in names}
    features = {t: inputs for t in names}
    for stage in range(len(columns[names[0]])):
        outputs = [columns[t][stage](features[t]) for t in names]
        mixed = CrossStitch(self_weight, name=f"cross_stitch_{stage}")(outputs)
        features = dict(zip(names, mixed, strict=True))
    encoder = keras.Model(inputs, features, name="encoder")

    # === Decoders ===
    return Parts(
        encoder=encoder,
        decoders=_common.own_feature_decoders(features, heads),
        supports_representation=False,
        shared_description="every task's trunk column and every cross-stitch unit",
    )
