"""GradDrop (Chen et al., 2020): randomly drop gradient signs by their purity."""

from __future__ import annotations

import keras
from keras import ops

from kmtl import backend
from kmtl.registry import register
from kmtl.weighting import _checks, _random
from kmtl.weighting.base import Weighting


@register("weighting", "graddrop")
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
    `mode="parameters"` the mask is per parameter coordinate. `aggregate(G)`
    always reads `G` as `[T, D]` coordinates (one mask entry per column).

    GradDrop is not Gram-based (it works coordinate by coordinate), so it
    overrides `combine_gradients`. Its logged task weights are the
    fractions of each task's gradient mass (L1) that were kept; with
    `update_every > 1` the steps in between use these fractions as fixed
    weights. Absent tasks have zero gradients, take no part in the purity
    and get weight 0. Random numbers come from the stateless generator of
    `kmtl.weighting._random`, keyed by `(seed, draw counter)`: the same on
    every replica and with or without XLA, reproducible for a seed,
    continued after a reload; the counter advances with every committed
    step.

    Under `tf.distribute` in representation mode, the batch sums of the
    representation gradients (and the kept and total masses of the logged
    weights) are summed over replicas before the purity is computed, so
    every replica applies the mask of the global batch and the step equals
    the single-device step on the same global batch. In parameter mode the
    gradients are summed over replicas first and every replica applies the
    same mask.

    Args:
        leak: fraction of a dropped gradient that is kept, in [0, 1].
        seed: integer seed; `None` draws one at construction from Python's
            `random` (so `keras.utils.set_random_seed` fixes it; kept in the
            config).
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for a `leak` outside [0, 1] or a `seed` that is not a
            non-negative integer.

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
        self.leak = _checks.number(leak, "leak", low=0.0, high=1.0)
        self.seed = _checks.seed(seed)

    def build_state(self, num_tasks: int) -> None:
        self.draws = self.add_state("draws", (), "zeros", dtype="int64")

    def combine_gradients(self, grads, values, present, step, state):
        if self.mode == "representation":
            # Each replica holds its own examples: the purity is of the global batch.
            return self.drop(grads, present, state, batch_separated=True, reduce=backend.sum_over_replicas)
        return self.drop(grads, present, state, batch_separated=False)

    def aggregate(self, G, losses=None, present=None, step: int = 0):
        """Matrix in, vector out: `[T, D]` -> `[D]`, one mask entry per column of `G` in every mode.

        Pure, like `Weighting.aggregate`: uses the current draw counter (0
        if the strategy is not built) and changes nothing.
        """
        G = ops.convert_to_tensor(G)
        if len(G.shape) != 2:
            raise ValueError(f"`G` must be a [num_tasks, dim] matrix. Received: shape={tuple(G.shape)}")
        num_tasks = int(G.shape[0])
        if self.built and self.num_tasks != num_tasks:
            raise ValueError(
                f"GradDrop was built for {self.num_tasks} tasks. Received: G with {num_tasks} rows"
            )
        present = ops.ones((num_tasks,), "bool") if present is None else ops.cast(present, "bool")
        state = self.state() if self.built else {"draws": ops.zeros((), "int64")}
        combined, _, _ = self.drop([G], present, state, batch_separated=False)
        return combined[0]

    def drop(self, grads, present, state, batch_separated: bool, reduce=None):
        """Pure GradDrop of stacked gradients: `(combined, kept_fractions, new_state)`.

        `batch_separated`: `grads` are `[T, batch, *features]` and the mask
        is computed on their sum over the batch axis. `reduce`: a function
        that sums a list of tensors over the parts of a batch held elsewhere
        (replicas); applied to the batch sums and to the masses.
        """
        reduce = reduce or (lambda tensors: tensors)
        present = ops.cast(present, "bool")
        key = _random.key(self.seed, state["draws"])
        kept_mass, total_mass, combined = 0.0, 0.0, []
        for index, g in enumerate(grads):
            g = ops.convert_to_tensor(g)
            rank = len(g.shape)
            g = ops.where(ops.reshape(present, (-1,) + (1,) * (rank - 1)), g, ops.zeros_like(g))
            signal = reduce([ops.sum(g, axis=1)])[0] if batch_separated else g
            total = ops.sum(signal, axis=0)
            magnitude = ops.sum(ops.abs(signal), axis=0)
            nonzero = magnitude > 0
            ratio = ops.where(nonzero, total / ops.where(nonzero, magnitude, ops.ones_like(magnitude)), 0.0)
            purity = 0.5 * (1.0 + ratio)
            # U in (0, 1), compared in at least float32: a U of exactly 0 (a float32 draw can be)
            # would drop a coordinate every task pushes down (purity 0 is not < 0), and a U near 1
            # rounded to 1.0 in a 16-bit dtype one every task pushes up (purity 1 is not > 1).
            noise = _random.uniform(key, tuple(ops.shape(purity)), stream=index)
            noise = ops.where(noise > 0, noise, 2.0**-25)
            if keras.backend.standardize_dtype(g.dtype) in ("float32", "float64"):
                noise = ops.cast(noise, g.dtype)
            else:
                purity = ops.cast(purity, "float32")
            keep = ops.logical_or(
                ops.logical_and(signal > 0, purity > noise), ops.logical_and(signal < 0, purity < noise)
            )
            factor = self.leak + (1.0 - self.leak) * ops.cast(keep, g.dtype)
            if batch_separated:
                factor = ops.expand_dims(factor, 1)
            kept = factor * g
            combined.append(ops.sum(kept, axis=0))
            kept_mass += ops.sum(ops.reshape(ops.abs(kept), (ops.shape(g)[0], -1)), axis=1)
            total_mass += ops.sum(ops.reshape(ops.abs(g), (ops.shape(g)[0], -1)), axis=1)
        kept_mass, total_mass = reduce([kept_mass, total_mass])
        has_mass = total_mass > 0
        fraction = ops.where(has_mass, kept_mass / ops.where(has_mass, total_mass, 1.0), 1.0)
        weights = ops.where(present, ops.cast(fraction, "float32"), 0.0)
        return combined, weights, {"draws": state["draws"] + 1}

    def get_config(self):
        base_config = super().get_config()
        config = {"leak": self.leak, "seed": self.seed}
        return {**base_config, **config}
