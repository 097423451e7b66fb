"""Inspecting expert architectures: how much each task uses each expert."""

from __future__ import annotations

import keras
import numpy as np

_GATED = ("mmoe", "cgc", "ple")


def _check_gated(model):
    architecture = getattr(model, "architecture", None)
    if architecture not in _GATED:
        raise ValueError(
            f"Expert utilisation exists for gated expert architectures {list(_GATED)} only. "
            f"Received: a model with architecture={architecture!r}"
        )
    return architecture


def expert_labels(model) -> dict:
    """`{task: [expert name]}` in the order of `expert_utilization`'s entries.

    MMoE: `expert_0 ...`; CGC/PLE (last level): `shared_0 ...` then the
    task's own `<task>_0 ...`.

    Raises:
        ValueError: for a model that is not MMoE, CGC or PLE.
    """
    architecture = _check_gated(model)
    options = model.architecture_options
    if architecture == "mmoe":
        count = options.get("num_experts", 4)
        return {t: [f"expert_{i}" for i in range(count)] for t in model.task_names}
    shared = [f"shared_{i}" for i in range(options.get("num_shared_experts", 2))]
    own = options.get("num_task_experts", 1)
    return {t: shared + [f"{t}_{i}" for i in range(own)] for t in model.task_names}


def _batches(data, steps):
    if hasattr(data, "element_spec") and hasattr(data, "take"):  # a tf.data.Dataset
        iterator = iter(data if steps is None else data.take(steps))
        for batch in iterator:
            yield batch[0] if isinstance(batch, tuple) else batch
        return
    x = data[0] if isinstance(data, tuple) else data
    size = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    for i, start in enumerate(range(0, size, 256)):
        if steps is not None and i >= steps:
            return
        yield (
            {k: v[start : start + 256] for k, v in x.items()}
            if isinstance(x, dict)
            else x[start : start + 256]
        )


def expert_utilization(model, dataset, steps: int | None = None) -> dict:
    """Mean gate weight of every expert, per task, over a dataset.

    For MMoE the gate of task `t` weighs all experts; for CGC and PLE it is
    the last level's gate of `t`, over the shared experts and `t`'s own
    experts (`expert_labels` names the entries). Each row sums to 1.

    Args:
        model: a `kmtl.MultiTaskModel` built with architecture `"mmoe"`,
            `"cgc"` or `"ple"`.
        dataset: a batched `tf.data.Dataset` yielding `x` or `(x, y, ...)`,
            or an array of inputs (or an `(x, y)` tuple of arrays).
        steps: number of batches to use (default: all).

    Returns:
        `{task: np.ndarray of shape [num_experts]}`.

    Raises:
        ValueError: for other architectures or an empty dataset.

    Example:

    >>> usage = kmtl.architectures.expert_utilization(model, test, steps=10)  # doctest: +SKIP
    >>> usage["digit"].round(2)                                               # doctest: +SKIP
    array([0.31, 0.22, 0.19, 0.28], dtype=float32)
    """
    _check_gated(model)
    gates = {
        t: keras.Model(decoder.input, decoder.get_layer(f"{t}_gate").output)
        for t, decoder in model.decoders.items()
    }
    totals = {t: None for t in gates}
    count = 0
    for x in _batches(dataset, steps):
        representation = model.encoder(x, training=False)
        for t, gate in gates.items():
            weights = np.asarray(gate(representation, training=False), dtype=np.float64)
            totals[t] = weights.sum(0) if totals[t] is None else totals[t] + weights.sum(0)
        count += len(weights)
    if count == 0:
        raise ValueError("expert_utilization needs at least one example. Received: an empty dataset")
    return {t: (total / count).astype(np.float32) for t, total in totals.items()}
