"""Helpers shared by the architecture builders (option checks, trunk slicing)."""

from __future__ import annotations

import keras


def single_input(inputs, architecture: str):
    """Raises unless `inputs` is one tensor (not a dict of inputs)."""
    if isinstance(inputs, dict):
        raise ValueError(
            f"{architecture} takes one input; for tasks with different inputs use "
            f"architecture='task_routed'. Received: inputs with keys {sorted(inputs)}"
        )
    return inputs


def positive_int(value, option: str, architecture: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{architecture}: `{option}` must be an integer >= 1. Received: {option}={value!r}")
    return value


def choice(value, option: str, choices, architecture: str) -> str:
    if value not in choices:
        raise ValueError(
            f"{architecture}: `{option}` must be one of {list(choices)}. Received: {option}={value!r}"
        )
    return value


def check_trunk_input(trunk, tensor, architecture: str) -> None:
    """Raises if a conv trunk is applied to an input that is not an image."""
    if trunk.kind == "conv" and len(tensor.shape) != 4:
        raise ValueError(
            f"{architecture}: a conv trunk needs image inputs of shape (height, width, "
            f"channels). Received: input shape {tuple(tensor.shape[1:])}"
        )


def apply(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def stem_and_stages(trunk, gate_input: str, architecture: str):
    """Splits the trunk for expert architectures.

    Returns `(stem_blocks, first_expert_stage)`: with `gate_input="stem"` the
    trunk's first stage is one shared stem and experts are copies of the
    remaining stages; with `"input"` there is no stem and experts are copies
    of the whole trunk.
    """
    num_stages = len(trunk.stages("probe"))
    if gate_input == "input":
        return [], 0
    if num_stages < 2:
        raise ValueError(
            f"{architecture}: gate_input='stem' uses the trunk's first stage as a shared stem "
            f"and needs at least one more stage for the experts. Received: a trunk with "
            f"{num_stages} stage(s): {trunk!r}"
        )
    return trunk.stages("stem")[:1], 1


def stage_groups(num_stages: int, num_groups: int) -> list[tuple[int, int]]:
    """Splits `range(num_stages)` into `num_groups` consecutive `(start, stop)` slices;
    earlier groups take the remainder."""
    size, extra = divmod(num_stages, num_groups)
    bounds, start = [], 0
    for i in range(num_groups):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def expert(trunk, name: str, start: int, stop: int, x):
    """Applies fresh copies of the trunk stages `start:stop` to `x`."""
    return apply(trunk.stages(name)[start:stop], x)


def head_model(head, features, name: str) -> keras.Model:
    """A small functional model applying `head` to a tensor shaped like `features`."""
    x = keras.Input(shape=tuple(features.shape[1:]), dtype=features.dtype, name=f"{name}_features")
    return keras.Model(x, head(x), name=name)


def representation_inputs(representation, prefix: str):
    """Fresh decoder inputs shaped like `representation`.

    A flat dict gets `keras.Input`s named after its keys (Keras matches dict
    inputs by key and warns when tensor names differ); other structures use
    `kmtl.architectures.base.decoder_inputs`.
    """
    from kmtl.architectures.base import decoder_inputs

    if isinstance(representation, dict):
        return {
            key: keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype, name=key)
            for key, t in representation.items()
        }
    return decoder_inputs(representation, prefix)


def own_feature_decoders(features: dict, heads) -> dict:
    """`{task: decoder}` over the whole `{task: features}` dict, each reading its own task's entry.

    The decoders of architectures whose encoder keeps one feature column per task
    (cross-stitch, soft sharing): every decoder takes the encoder's whole output, as
    the `Parts` contract asks, and applies its head to its own column.
    """
    decoders = {}
    for head in heads:
        rep = representation_inputs(features, head.name)
        decoders[head.name] = keras.Model(rep, head(rep[head.name]), name=head.name)
    return decoders


def branch(tensor, name: str):
    """A copy of `tensor` (a reshape to its own shape) for the representation.

    Representation-level weighting takes each task's gradient with respect to
    every representation tensor and then back-propagates their combination
    through the encoder. That is only right if no representation tensor is
    computed from another one (else a gradient would count the downstream
    path twice), so a tensor that the encoder also uses internally (a stem,
    an MTAN stage) enters the representation through its own copy.
    """
    return keras.layers.Reshape(tuple(tensor.shape[1:]), name=name)(tensor)
