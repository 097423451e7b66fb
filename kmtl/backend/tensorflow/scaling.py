"""Loss scaling in the train step: unscaled float32 per-task gradients, scaled updates.

Under `keras.mixed_precision` policy `"mixed_float16"`, `Model.compile` wraps
the optimizer in a `keras.optimizers.LossScaleOptimizer`. Its `scale_loss`
multiplies a loss by its dynamic scale `s`, so that small float16 gradients do
not underflow, and its `apply` divides the gradients by `s`, skips the update
and halves `s` if any of them is not finite, and doubles `s` after
`dynamic_growth_steps` finite steps. A plain optimizer built with
`loss_scale_factor` scales by that constant instead (and has no skipping).

kmtl's gradient-level step combines per-task gradients with non-linear
aggregators (norms, projections, solvers), which must see the true gradients.
`LossScale` gives the step three conversions:

* `unscale`: a gradient of a scaled loss (any float dtype) to the float32
  gradient of the loss itself;
* `cotangent`: an unscaled float32 output gradient to the scaled one, in the
  dtype of the tensor it is the gradient of, for a backward pass through
  float16 (or bfloat16) layers;
* `for_optimizer`: the final unscaled update to the scaled one the optimizer
  expects (it divides by the same `s`: for a power-of-two scale both steps
  are exact in float32); on an overflow step every gradient is made NaN, so
  that a `LossScaleOptimizer` skips the update and lowers its scale on every
  replica.

An **overflow** is a step whose losses are finite but whose gradients are
not, under a `LossScaleOptimizer` whose scale is above 1. It is not a failure:
the step hands the optimizer its non-finite gradients and commits nothing
else. At a scale of 1 or less scaling cannot be the cause, and the step fails
as any non-finite step does.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class LossScale:
    """The loss scale of `optimizer` for one step (read once, before the update)."""

    def __init__(self, optimizer):
        self.dynamic = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.active = self.dynamic or getattr(optimizer, "loss_scale_factor", None) is not None
        if self.active:
            self.value = tf.cast(optimizer.scale_loss(tf.constant(1.0, tf.float32)), tf.float32)
        else:
            self.value = tf.constant(1.0, tf.float32)

    def unscale(self, gradient):
        """The float32 gradient of the unscaled loss."""
        gradient = tf.cast(gradient, tf.float32)
        return gradient / self.value if self.active else gradient

    def cotangent(self, gradient, dtype):
        """An unscaled float32 output gradient, scaled and cast to `dtype`."""
        if self.active:
            gradient = gradient * self.value
        return tf.cast(gradient, dtype)

    def overflow(self, losses_finite, gradients_finite):
        """Scalar bool: finite losses, non-finite gradients, a dynamic scale above 1."""
        if not self.dynamic:
            return tf.constant(False)
        return tf.logical_and(
            tf.logical_and(losses_finite, tf.logical_not(gradients_finite)), self.value > 1.0
        )

    def for_optimizer(self, gradients, variables, overflow):
        """The unscaled update scaled back for the optimizer, in each variable's dtype.

        All NaN on an overflow step.
        """
        if self.active:
            factor = self.value
            if self.dynamic:
                factor = tf.where(overflow, tf.constant(float("nan"), tf.float32), factor)
            gradients = [g * factor for g in gradients]
        return [tf.cast(g, v.dtype) for g, v in zip(gradients, variables)]


__all__ = ["LossScale"]
