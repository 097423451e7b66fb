"""Hard parameter sharing: one shared trunk (or its first blocks), one head per task."""

from __future__ import annotations

import keras

from kmtl.architectures.base import Parts, decoder_inputs
from kmtl.registry import register


def _check_shared_depth(shared_depth, trunk) -> int:
    """`shared_depth` as an int in `[0, trunk.num_blocks]` (None: all blocks)."""
    num_blocks = trunk.num_blocks
    if shared_depth is None:
        return num_blocks
    if (
        isinstance(shared_depth, bool)
        or not isinstance(shared_depth, int)
        or not 0 <= shared_depth <= num_blocks
    ):
        raise ValueError(
            f"hard_sharing: `shared_depth` must be None (share every block) or an integer in "
            f"[0, {num_blocks}], the number of trunk blocks ({trunk.num_conv_stages} conv, then "
            f"{len(trunk.dense_units)} dense; see `Trunk.num_blocks`). Received: shared_depth={shared_depth!r}"
        )
    return shared_depth


@register("architecture", "hard_sharing")
def build_hard_sharing(inputs, trunk, heads, shared_depth: int | None = None) -> Parts:
    """One trunk shared by all tasks, then each task's head.

    Blocks are counted as `trunk.stages()` returns them: first one block per
    conv layer (conv, [batch-norm], activation, pool, [dropout]), then one
    per Dense layer (the first one flattens); `trunk.num_blocks` is their
    number. With `shared_depth=k` the tasks share the first `k` blocks and
    each task gets its own fresh copy of blocks `k, k+1, ...` (named
    `<task>_trunk_block_<i>` / `<task>_trunk_dense_block_<i>`, `i` the
    block's index in the trunk) in front of its head.

    * `shared_depth=None` (default): every block is shared. The graph, layer
      and variable names are those of models saved before the option
      existed. `shared_depth=trunk.num_blocks` builds the same graph.
    * `shared_depth=0`: nothing is shared; the encoder passes the input
      through and has no variables, and each task has a whole trunk of its
      own. Loss-level weighting works as usual. Gradient-level strategies
      have no shared parameter to combine: in `mode="representation"` they
      combine the gradients of the input, which changes no parameter (each
      task's own trunk and head get that task's gradient, as always), so
      training is that of equal weighting; `mode="parameters"` is refused by
      `compile` (a `ValueError`: there is no shared gradient to combine).
      Use loss-level weighting with `shared_depth=0`.

    Shared parameters: the variables of the first `shared_depth` trunk
    blocks (all of them by default). Task-specific: each task's copies of the
    remaining blocks, then its head's tower and output layer. `stages` (the
    chain the Gram engine walks) holds the shared blocks only.

    Args:
        inputs: a `keras.Input` (single input).
        trunk: a `kmtl.trunks.Trunk`.
        heads: list of `kmtl.heads.Head`.
        shared_depth: None or the number of leading trunk blocks the tasks
            share, an integer in `[0, trunk.num_blocks]`.

    Returns:
        A `Parts` whose encoder outputs the features after the shared blocks.

    Raises:
        ValueError: if `inputs` is a dict (use `architecture="task_routed"`
            for tasks with different inputs), for a conv trunk on non-image
            inputs, or a `shared_depth` that is not None or an integer in
            `[0, trunk.num_blocks]`.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> trunk = trunks.conv(filters=(4, 8), dense_units=(16,))
    >>> trunk.num_blocks
    3
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Binary("parity")],
    ...     trunk=trunk, input_shape=(28, 28, 1), shared_depth=2)
    >>> tuple(model.encoder.output.shape)
    (None, 7, 7, 8)
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
    depth = _check_shared_depth(shared_depth, trunk)
    stages = trunk.stages("trunk")[:depth]
    features = inputs
    for stage in stages:
        features = stage(features)
    encoder = keras.Model(inputs, features, name="encoder")
    decoders = {}
    for head in heads:
        rep = decoder_inputs(features, head.name)
        x = rep
        if depth < trunk.num_blocks:
            for block in trunk.stages(f"{head.name}_trunk")[depth:]:
                x = block(x)
        decoders[head.name] = keras.Model(rep, head(x), name=head.name)
    if depth == trunk.num_blocks:
        description = "all trunk variables"
    elif depth == 0:
        description = "none (shared_depth=0: every task has its own trunk)"
    else:
        description = f"the first {depth} of the trunk's {trunk.num_blocks} blocks"
    return Parts(
        encoder=encoder,
        decoders=decoders,
        supports_representation=True,
        shared_description=description,
        stages=stages,
    )
