"""Uncertainty weighting (Kendall et al., 2018): learned log-variances."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from kmtl.registry import register
from kmtl.weighting import _checks
from kmtl.weighting.base import Weighting

FORMS = ("full", "half")
#: Default initial log-variance of each form.
DEFAULT_INIT = {"full": 0.0, "half": -0.5}


@register("weighting", "uncertainty")
class Uncertainty(Weighting):
    """Homoscedastic uncertainty weighting with learned log-variances.

    Every task `t` has a trainable log-variance `s_t = log sigma_t^2`,
    trained by the model's optimizer together with the model. With a
    factor `f_t` the training loss is

        total = sum_{t present} (f_t * exp(-s_t) * L_t + f_t * s_t)

    so `d total / d s_t = f_t (1 - exp(-s_t) L_t)`: whatever `f_t`, the
    optimum for a fixed loss is `s_t = log L_t`, and a task with a large
    loss gets a small weight `f_t exp(-s_t)` (the logged task weight).
    Absent tasks contribute nothing, so their `s_t` gets a zero gradient.

    Two forms (`form`):

    * `"full"` (default): `f_t = 1`, i.e. `exp(-s_t) L_t + s_t`, starting
      from `s_t = 0`. It is twice the paper's Gaussian (regression)
      negative log-likelihood `L_t / (2 sigma_t^2) + log sigma_t`, and the
      form of the example code by the paper's authors (Gal's
      `multi-task-learning-example`: `exp(-log_var) * loss + log_var`,
      log-variances initialised to 0). For the tasks listed in
      `regression_tasks` the paper's Gaussian term itself is used,
      `f_t = 1/2`: `0.5 exp(-s_t) L_t + 0.5 s_t` (same optimum, half the
      weight).
    * `"half"`: `f_t = 1/2` for every task,
      `L_t / (2 exp(s_t)) + s_t / 2`, starting from `s_t = -0.5` (initial
      weight `0.5 e^0.5 ~ 0.82`). This is LibMTL's `UW` (its log-variances
      start at -0.5); `regression_tasks` does not apply.

    Args:
        init_log_variance: initial value of every `s_t`. Default: 0 for
            `form="full"`, -0.5 for `form="half"`.
        regression_tasks: `form="full"` only: names of tasks that use the
            Gaussian form with the 1/2 factors. Must be task names of the
            model.
        form: `"full"` or `"half"` (see above).
        **kwargs: base `Weighting` arguments (`name`).

    Raises:
        ValueError: for a non-finite or non-numeric `init_log_variance`, an
            unknown `form`, `regression_tasks` that is not a list of names or
            is given with `form="half"`, or (when built) a name in
            `regression_tasks` that is not a task.

    Example:

    >>> import keras
    >>> from kmtl.weighting import Uncertainty
    >>> strategy = Uncertainty()
    >>> strategy.build(["digit", "parity"])
    >>> losses, present = keras.ops.array([0.5, 2.0]), keras.ops.array([True, True])
    >>> total, weights, _ = strategy.combine(losses, losses, present, 0, strategy.state())
    >>> float(total)  # s = 0: exp(0) * (0.5 + 2.0) + 0
    2.5

    References:
        Kendall, Gal and Cipolla. Multi-Task Learning Using Uncertainty to
        Weigh Losses for Scene Geometry and Semantics. CVPR 2018.
        https://arxiv.org/abs/1705.07115

        Gal. multi-task-learning-example (Keras and PyTorch notebooks).
        https://github.com/yaringal/multi-task-learning-example

        LibMTL, `LibMTL/weighting/UW.py`.
        https://github.com/median-research-group/LibMTL
    """

    level = "loss"

    def __init__(
        self,
        init_log_variance: float | None = None,
        regression_tasks: Sequence[str] = (),
        form: str = "full",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.form = _checks.choice(form, "form", FORMS)
        if init_log_variance is None:
            init_log_variance = DEFAULT_INIT[form]
        self.init_log_variance = _checks.number(init_log_variance, "init_log_variance")
        self.regression_tasks = _checks.names(regression_tasks, "regression_tasks")
        if form == "half" and self.regression_tasks:
            raise ValueError(
                "`regression_tasks` only applies to form='full' (form='half' already uses the 1/2 "
                f"factors for every task). Received: regression_tasks={list(self.regression_tasks)!r}"
            )

    def build_state(self, num_tasks: int) -> None:
        regression = _checks.names_subset(self.regression_tasks, "regression_tasks", self.task_names)
        half = self.form == "half"
        self._factors = [0.5 if half or t in regression else 1.0 for t in self.task_names]
        self.log_variances = self.add_weight(
            shape=(num_tasks,),
            initializer=keras.initializers.Constant(self.init_log_variance),
            dtype="float32",
            trainable=True,
            name="log_variances",
        )

    def combine(self, losses, values, present, step, state):
        dtype = losses.dtype
        present = ops.cast(present, "bool")
        factors = ops.convert_to_tensor(self._factors, dtype=dtype)
        s = ops.cast(self.log_variances, dtype)
        weights = factors * ops.exp(-s)
        safe = ops.where(present, losses, ops.zeros_like(losses))
        terms = ops.where(present, weights * safe + factors * s, ops.zeros_like(safe))
        logged = ops.stop_gradient(ops.where(present, weights, ops.zeros_like(weights)))
        return ops.sum(terms), logged, {}

    def get_config(self):
        base_config = super().get_config()
        config = {
            "init_log_variance": self.init_log_variance,
            "regression_tasks": list(self.regression_tasks),
            "form": self.form,
        }
        return {**base_config, **config}
