"""GradDrop (Chen et al., 2020): randomly drop gradient signs by their purity."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="kmtl")
class GradDrop(Weighting):
    """Gradient sign dropout.

    At every coordinate, the gradient sign purity of the task gradients
    `g_t` is

        P = 1/2 (1 + sum_t g_t / sum_t |g_t|)   in [0, 1]

    (1 when every task pushes the same way up, 0 when every task pushes
    down). With `U ~ Uniform(0, 1)` drawn per coordinate, task `t` keeps its
    gradient there if it is positive and `P > U`, or negative and `P < U`;
    the other sign is dropped. So coordinates where all tasks agree are
    always kept, and under conflict one sign survives, with the probability
    of its share. With `leak` in [0, 1] a task keeps that fraction of a
    dropped gradient. The update is `sum_t (leak + (1 - leak) M_t) g_t`.

    The paper applies GradDrop to the gradients at the shared activations
    (the representation), so `default_mode` is `"representation"`: `grads`
    are then `[T, batch, *features]` and, as in the paper's batch-separated
    case, purity and signs are computed on the gradients summed over the
    batch axis and the mask (one per feature) applies to every example.
    kmtl does not pre-multiply by `sign(representation)` (the paper's
    correction for the sign of the activations): for a non-negative (ReLU)
    representation this makes no difference to the trunk's gradient. In
    `mode="parameters"` the mask is per parameter coordinate.

    GradDrop is not Gram-based (it works coordinate by coordinate), so it
    overrides `combine_gradients`. Its logged task weights are the
    fractions of each task's gradient mass (L1) that were kept; with
    `update_every > 1` the steps in between use these fractions as fixed
    weights. Absent tasks have zero gradients, take no part in the purity
    and get weight 0. Random numbers come from a stateless generator keyed by
    `(seed, draw counter)`: the same on every replica and with or without
    XLA, reproducible for a seed, continued after a reload.

    Under `tf.distribute.MirroredStrategy` in representation mode, each
    replica computes the purity from its own part of the batch (the
    representation gradients of different examples are not summed across
    replicas), so the masks, and the logged weights kept by the first
    replica, are per replica rather than for the global batch. In parameter
    mode the gradients are summed over replicas first and every replica
    applies the same mask.

    Args:
        leak: fraction of a dropped gradient that is kept, in [0, 1].
        seed: integer seed; `None` draws one at construction (kept in the
            config).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for a `leak` outside [0, 1] or a bad `seed`.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import GradDrop
    >>> G = np.array([[1.0, 2.0, -1.0], [3.0, 1.0, -2.0]])  # no sign conflict
    >>> GradDrop(seed=0).aggregate(G).numpy()
    array([ 4.,  3., -3.])

    References:
        Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov. Just
        Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
        Dropout. NeurIPS 2020. https://arxiv.org/abs/2010.06808
    """

    level = "gradient"
    gram_based = False
    default_mode = "representation"

    def __init__(self, leak: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(leak, bool) or not isinstance(leak, (int, float)) or not 0 <= float(leak) <= 1:
            raise ValueError(f"`leak` must be a number in [0, 1]. Received: leak={leak!r}")
        self.leak = float(leak)
        self.seed = _solvers.check_seed(seed)

    def build_state(self, num_tasks: int) -> None:
        self.draws = self.add_state("draws", (), "zeros", dtype="int64")

    def combine_gradients(self, grads, losses, present, step):
        return self._drop(grads, present, batch_separated=self.mode == "representation")

    def aggregate(self, G):
        """Pure function form: `[T, D]` -> `[D]`, one mask entry per coordinate (no batch axis)."""
        G = tf.convert_to_tensor(G)
        num_tasks = int(G.shape[0])
        if not self.built:
            self.build([f"task_{i}" for i in range(num_tasks)])
        return self._drop([G], tf.ones((num_tasks,), tf.bool), batch_separated=False)[0]

    def _drop(self, grads, present, batch_separated):
        key = _solvers.next_key(self.seed, self.draws)
        kept_mass, total_mass, combined = 0.0, 0.0, []
        for index, g in enumerate(grads):
            present_shape = tf.concat([[-1], tf.ones_like(tf.shape(g))[1:]], 0)
            g = g * tf.reshape(tf.cast(present, g.dtype), present_shape)
            signal = tf.reduce_sum(g, axis=1) if batch_separated else g
            total = tf.reduce_sum(signal, axis=0)
            magnitude = tf.reduce_sum(tf.abs(signal), axis=0)
            ratio = tf.where(
                magnitude > 0, total / tf.where(magnitude > 0, magnitude, tf.ones_like(magnitude)), 0.0
            )
            purity = 0.5 * (1.0 + ratio)
            noise = tf.cast(_solvers.uniform(key, tf.shape(purity), stream=index), g.dtype)
            keep = tf.where(signal > 0, purity > noise, tf.where(signal < 0, purity < noise, False))
            factor = self.leak + (1.0 - self.leak) * tf.cast(keep, g.dtype)
            if batch_separated:
                factor = tf.expand_dims(factor, 1)
            kept = factor * g
            combined.append(tf.reduce_sum(kept, axis=0))
            num_tasks = tf.shape(g)[0]
            kept_mass += tf.reduce_sum(tf.abs(tf.reshape(kept, (num_tasks, -1))), axis=1)
            total_mass += tf.reduce_sum(tf.abs(tf.reshape(g, (num_tasks, -1))), axis=1)
        fraction = tf.where(total_mass > 0, kept_mass / tf.where(total_mass > 0, total_mass, 1.0), 1.0)
        weights = fraction * tf.cast(present, fraction.dtype)
        self.task_weights.assign(tf.cast(weights, self.task_weights.dtype))
        return combined

    def get_config(self):
        base_config = super().get_config()
        config = {"leak": self.leak, "seed": self.seed}
        return {**base_config, **config}
