"""Static loss weighting: equal weights and fixed user weights.

Both strategies return `sum_t w_t * present_t * L_t` with weights that never
change during training; they keep no state besides `task_weights`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks
from kmtl.weighting.base import Weighting


@register("weighting", "equal")
class Equal(Weighting):
    """Equal weighting: the plain sum of the per-task losses.

    `total = sum_t present_t * L_t`; every present task has weight 1 and an
    absent task (no labels in the batch) weight 0. This is what Keras does
    with no `loss_weights`, and the baseline every other strategy is
    compared with.

    Args:
        **kwargs: base `Weighting` arguments (`name`).

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import Equal
    >>> Equal().aggregate(np.array([[1.0, 0.0], [0.0, 2.0]])).numpy()
    array([1., 2.])
    """

    level = "loss"

    def combine(self, losses, values, present, step, state):
        weights = ops.cast(present, losses.dtype)
        return ops.sum(weights * losses), weights, {}


@keras.saving.register_keras_serializable(package="kmtl")
class Static(Weighting):
    """Fixed user weights: `total = sum_t w_t * present_t * L_t`.

    The weights are constants set at construction (the strategy form of
    Keras' `loss_weights`); an absent task's term is dropped and its logged
    weight is 0.

    Args:
        weights: a dict `{task_name: weight}` with an entry for every task
            of the model, or a list of weights in task order. Weights are
            finite and >= 0.
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for negative or non-finite weights, for an empty
            `weights`, and (when built) for task names missing from or
            unknown to `weights`, or a list of the wrong length.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import Static
    >>> Static(weights=[1.0, 0.5]).aggregate(np.array([[1.0, 0.0], [0.0, 2.0]])).numpy()
    array([1., 1.])
    """

    level = "loss"

    def __init__(self, weights: Mapping[str, float] | Sequence[float], **kwargs):
        super().__init__(**kwargs)
        if isinstance(weights, Mapping):
            items = list(weights.items())
            checked = {}
            for task, value in items:
                if not isinstance(task, str):
                    raise ValueError(
                        f"`weights` keys must be task names (str). Received: weights={dict(weights)!r}"
                    )
                checked[task] = self._check_weight(value, f"weights[{task!r}]")
            weights = checked
        elif isinstance(weights, (list, tuple)):
            weights = [self._check_weight(v, f"weights[{i}]") for i, v in enumerate(weights)]
        else:
            raise ValueError(
                "`weights` must be a dict {task_name: weight} or a list of weights. "
                f"Received: weights={weights!r} of type {type(weights).__name__}"
            )
        if not weights:
            raise ValueError(f"`weights` must not be empty. Received: weights={weights!r}")
        self.weights_spec = weights

    @staticmethod
    def _check_weight(value, argument: str) -> float:
        return _checks.number(value, argument, low=0.0)

    def build_state(self, num_tasks: int) -> None:
        spec = self.weights_spec
        if isinstance(spec, dict):
            missing = [t for t in self.task_names if t not in spec]
            unknown = [t for t in spec if t not in self.task_names]
            if missing or unknown:
                raise ValueError(
                    f"`weights` must have exactly one entry per task {self.task_names}; "
                    f"missing: {missing}, unknown: {unknown}. Received: weights={spec!r}"
                )
            self._values = [spec[t] for t in self.task_names]
        else:
            if len(spec) != num_tasks:
                raise ValueError(
                    f"`weights` has {len(spec)} entries but the model has {num_tasks} tasks "
                    f"{self.task_names}. Received: weights={spec!r}"
                )
            self._values = list(spec)

    def combine(self, losses, values, present, step, state):
        weights = ops.convert_to_tensor(self._values, dtype=losses.dtype)
        weights = weights * ops.cast(present, losses.dtype)
        return ops.sum(weights * losses), weights, {}

    def get_config(self):
        base_config = super().get_config()
        spec = self.weights_spec
        config = {"weights": dict(spec) if isinstance(spec, dict) else list(spec)}
        return {**base_config, **config}
