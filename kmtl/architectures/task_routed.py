"""Task-routed models: tasks with different inputs sharing one trunk."""

from __future__ import annotations

import warnings

import keras

from kmtl.architectures import _common
from kmtl.architectures.base import Parts
from kmtl.registry import register


def _resolve_routes(input_names, head_names, routes) -> dict:
    """Returns `{head: input_name}` after checking it against the inputs and heads."""
    if routes is None:
        if set(input_names) != set(head_names):
            raise ValueError(
                "task_routed: by default each head reads the input of the same name, but the "
                f"input names {sorted(input_names)} do not match the head names "
                f"{sorted(head_names)}. Rename the inputs or pass routes={{head: input_name}}. "
                f"Received: inputs={sorted(input_names)}"
            )
        return {h: h for h in head_names}
    if not isinstance(routes, dict):
        raise ValueError(
            f"task_routed: `routes` must be a dict {{head: input_name}}. Received: routes={routes!r}"
        )
    unknown = sorted(set(routes) - set(head_names))
    missing = [h for h in head_names if h not in routes]
    if unknown or missing:
        raise ValueError(
            f"task_routed: `routes` needs exactly one entry per head {head_names}"
            f"{f'; unknown heads {unknown}' if unknown else ''}"
            f"{f'; missing heads {missing}' if missing else ''}. Received: routes={routes!r}"
        )
    bad = {h: n for h, n in routes.items() if n not in input_names}
    if bad:
        raise ValueError(
            f"task_routed: routes point to unknown inputs. Inputs: {sorted(input_names)}. "
            f"Received: routes={routes!r}"
        )
    unused = sorted(set(input_names) - set(routes.values()))
    if unused:
        raise ValueError(f"task_routed: input(s) {unused} are read by no head. Received: routes={routes!r}")
    return {h: routes[h] for h in head_names}


@register("architecture", "task_routed")
def build_task_routed(inputs, trunk, heads, routes: dict | None = None) -> Parts:
    """Each task reads its own input; one trunk is shared by all inputs.

    The trunk's layers (one `keras.Sequential` named `trunk`) are applied to
    each input separately, so the tasks share every trunk weight but not
    their inputs. The encoder outputs `{input_name: features}`; task `t`'s
    decoder applies its head (a model `<task>_tower`) to the features of its
    input. By default every head reads the input with its own name;
    `routes={head: input_name}` lets several heads read one input.

    Train on batches `({input: x}, {task: y}, {task: mask})` from
    `kmtl.data.mix(..., routed=True)` (each example under its own task's
    input, zeros under the others, masked out of the other tasks' losses).
    Note that the zero inputs of masked examples still pass through the
    trunk (they would shift batch-norm statistics).

    Shared parameters: all trunk variables. Task-specific: each head.
    `supports_representation` is False: every decoder reads a different
    input's features. Serve one task alone with `task_submodel`.

    Args:
        inputs: a dict `{input_name: keras.Input}` (from
            `kmtl.build_model(inputs={...})`) whose inputs have equal shapes.
        trunk: a `kmtl.trunks.Trunk`.
        heads: list of `kmtl.heads.Head`.
        routes: optional `{head: input_name}`.

    Returns:
        A `Parts`.

    Raises:
        ValueError: for a single (non-dict) input, input names that do not
            match the head names (without `routes`), bad routes, unused
            inputs or inputs of different shapes.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Classification("item", 10)],
    ...     inputs={"digit": (28, 28, 1), "item": (28, 28, 1)},
    ...     trunk=trunks.dense((32,)), architecture="task_routed")
    >>> sorted(model.output_names)
    ['digit', 'item']
    """
    # === Config ===
    if not isinstance(inputs, dict):
        raise ValueError(
            "task_routed needs one input per task: build the model with "
            "inputs={name: shape} instead of input_shape. "
            f"Received: a single input of shape {tuple(inputs.shape[1:])}"
        )
    routes = _resolve_routes(list(inputs), [h.name for h in heads], routes)
    used = [n for n in inputs if n in set(routes.values())]
    shapes = {n: tuple(inputs[n].shape[1:]) for n in used}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"task_routed: the trunk is shared, so all inputs need the same shape. Received: {shapes}"
        )
    for n in used:
        _common.check_trunk_input(trunk, inputs[n], "task_routed")
    clashes = sorted({inputs[n].name for n in inputs} & {h.name for h in heads})
    if clashes:
        raise ValueError(
            f"task_routed: the model's input layer(s) {clashes} have the same names as heads, and "
            "Keras needs unique layer names (each head's decoder is named after the head). "
            "kmtl.MultiTaskModel must name its input layers differently from the heads (e.g. "
            f"'<name>_input'). Received: input layer names {sorted(inputs[n].name for n in inputs)}"
        )

    # === Encoder: one trunk applied to every input ===
    shared = keras.Sequential(trunk.stages("trunk"), name="trunk")
    features = {n: shared(inputs[n]) for n in used}
    with warnings.catch_warnings():
        # Input layers may be named apart from their keys (see the check above).
        warnings.filterwarnings("ignore", message="When providing `inputs` as a dict")
        encoder = keras.Model(inputs, features, name="encoder")

    # === Decoders ===
    decoders = {}
    for head in heads:
        rep = _common.representation_inputs(features, head.name)
        tower = _common.head_model(head, features[routes[head.name]], f"{head.name}_tower")
        decoders[head.name] = keras.Model(rep, tower(rep[routes[head.name]]), name=head.name)
    return Parts(
        encoder=encoder,
        decoders=decoders,
        supports_representation=False,
        shared_description="all trunk variables (one trunk applied to each task's input)",
    )


def _check_routed(model):
    if getattr(model, "architecture", None) != "task_routed":
        raise ValueError(
            "Per-task inputs exist only for architecture='task_routed'. "
            f"Received: a model with architecture={getattr(model, 'architecture', None)!r}"
        )


def task_inputs(model) -> dict:
    """`{task: [input_name]}`: the model inputs each task of a task-routed model reads.

    Raises:
        ValueError: if `model` is not a task-routed `kmtl.MultiTaskModel`.
    """
    _check_routed(model)
    routes = _resolve_routes(list(model.input), model.task_names, model.architecture_options.get("routes"))
    return {t: [routes[t]] for t in model.task_names}


def task_submodel(model, task: str) -> keras.Model:
    """A model from one task's input alone to that task's output.

    Shares its layers (and so its weights) with `model`. The result takes
    `{input_name: x}` and returns `{task: y}`, equal to `model`'s output for
    `task`; `kmtl.export.saved_model` serves it as the `serve_<task>`
    signature.

    Args:
        model: a task-routed `kmtl.MultiTaskModel`.
        task: a head name.

    Returns:
        A `keras.Model`.

    Raises:
        ValueError: if `model` is not task-routed or `task` is not a head.

    Example:

    >>> digit_only = kmtl.architectures.task_submodel(model, "digit")  # doctest: +SKIP
    >>> digit_only({"digit": images})["digit"].shape                   # doctest: +SKIP
    (32, 10)
    """
    routing = task_inputs(model)
    if task not in routing:
        raise ValueError(f"Unknown task {task!r}. Tasks: {model.task_names}. Received: task={task!r}")
    name = routing[task][0]
    x = keras.Input(shape=tuple(model.input[name].shape[1:]), dtype=model.input[name].dtype, name=name)
    features = model.encoder.get_layer("trunk")(x)
    output = model.decoders[task].get_layer(f"{task}_tower")(features)
    return keras.Model({name: x}, {task: output}, name=f"{task}_model")
