"""Uncertainty weighting (Kendall et al., 2018): learned log-variances."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class Uncertainty(Weighting):
    """Homoscedastic uncertainty weighting with learned log-variances.

    Every task `t` has a trainable log-variance `s_t = log sigma_t^2`
    (initialised to `init_log_variance`), trained by the model's optimizer
    together with the model. The training loss is

        total = sum_t present_t * (exp(-s_t) * L_t + s_t)

    so `d total / d s_t = 1 - exp(-s_t) * L_t` and, for a fixed loss, the
    optimum is `s_t = log L_t`: a task with a large loss gets a small weight
    `exp(-s_t)`. This is the form used by most implementations (e.g.
    LibMTL); it is twice the negative log-likelihood of Kendall et al.'s
    Gaussian (regression) case. For the tasks listed in `regression_tasks`
    the paper's exact Gaussian term is used instead:
    `0.5 * exp(-s_t) * L_t + 0.5 * s_t` (its optimum is the same
    `s_t = log L_t`; the weight is halved). Absent tasks contribute nothing,
    so their `s_t` gets a zero gradient.

    The logged task weight is the factor multiplying `L_t`: `exp(-s_t)`
    (or `0.5 * exp(-s_t)`).

    Args:
        init_log_variance: initial value of every `s_t`.
        regression_tasks: names of tasks that use the Gaussian form with
            the 0.5 factors. Must be task names of the model.
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for a non-finite `init_log_variance`, a non-string entry
            in `regression_tasks`, or (when built) a name that is not a task.

    Example:

    >>> import keras
    >>> from kmtl.weighting import Uncertainty
    >>> strategy = Uncertainty()
    >>> strategy.build(["digit", "parity"])
    >>> float(strategy.combine(keras.ops.array([0.5, 2.0]),
    ...                        keras.ops.array([True, True]), 0))  # s = 0
    2.5

    References:
        Kendall, Gal and Cipolla. Multi-Task Learning Using Uncertainty to
        Weigh Losses for Scene Geometry and Semantics. CVPR 2018.
        https://arxiv.org/abs/1705.07115
    """

    level = "loss"

    def __init__(
        self,
        init_log_variance: float = 0.0,
        regression_tasks: Sequence[str] = (),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(init_log_variance, bool) or not isinstance(init_log_variance, (int, float)):
            raise ValueError(
                f"`init_log_variance` must be a number. Received: init_log_variance={init_log_variance!r}"
            )
        if not abs(float(init_log_variance)) < float("inf"):
            raise ValueError(
                f"`init_log_variance` must be finite. Received: init_log_variance={init_log_variance!r}"
            )
        if isinstance(regression_tasks, str) or not all(isinstance(t, str) for t in regression_tasks):
            raise ValueError(
                "`regression_tasks` must be a list of task names. "
                f"Received: regression_tasks={regression_tasks!r}"
            )
        self.init_log_variance = float(init_log_variance)
        self.regression_tasks = tuple(regression_tasks)

    def build_state(self, num_tasks: int) -> None:
        unknown = [t for t in self.regression_tasks if t not in self.task_names]
        if unknown:
            raise ValueError(
                f"`regression_tasks` names tasks {unknown} that the model does not have "
                f"(tasks: {self.task_names}). Received: regression_tasks={list(self.regression_tasks)!r}"
            )
        self._factors = [0.5 if t in self.regression_tasks else 1.0 for t in self.task_names]
        self.log_variances = self.add_weight(
            shape=(num_tasks,),
            initializer=keras.initializers.Constant(self.init_log_variance),
            dtype="float32",
            trainable=True,
            name="log_variances",
        )

    def combine(self, losses, present, step):
        mask = ops.cast(present, losses.dtype)
        factors = ops.convert_to_tensor(self._factors, dtype=losses.dtype)
        s = ops.cast(self.log_variances, losses.dtype)
        weights = factors * ops.exp(-s)
        total = ops.sum(mask * (weights * losses + factors * s))
        self.task_weights.assign(ops.cast(ops.stop_gradient(weights * mask), self.task_weights.dtype))
        return total

    def get_config(self):
        base_config = super().get_config()
        config = {
            "init_log_variance": self.init_log_variance,
            "regression_tasks": list(self.regression_tasks),
        }
        return {**base_config, **config}
