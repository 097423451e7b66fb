"""CAGrad (Liu et al., 2021): conflict-averse gradient descent on the Gram matrix."""

from __future__ import annotations

import keras
import tensorflow as tf

from kmtl.weighting import _solvers
from kmtl.weighting.base import Weighting

_RESCALES = (0, 1, 2)


def _line_search(K, b, c, w, d, gamma_max):
    """Exact minimiser over [0, gamma_max] of h(g) = g * d.K b + c * sqrt(Q(g)).

    `Q(g) = |g_w + g g_d|^2 = p + 2 q g + r g^2`. Where `h'` vanishes,
    `u = q + r g` satisfies `u^2 (c^2 r - s^2) = s^2 (r p - q^2)` with
    `s = d.K b` and `u` of the sign opposite to `s`; if `c^2 r <= s^2`, `h`
    is monotone with the sign of `s`.
    """
    kd = tf.linalg.matvec(K, d)
    s = tf.tensordot(kd, b, 1)
    p = tf.tensordot(w, tf.linalg.matvec(K, w), 1) + 1e-20
    q = tf.tensordot(w, kd, 1)
    r = tf.tensordot(d, kd, 1)
    c2r = c * c * r
    denominator = c2r - s * s
    u_squared = s * s * tf.maximum(r * p - q * q, 0.0) / tf.maximum(denominator, 1e-300)
    u = -tf.sign(s) * tf.sqrt(u_squared)
    stationary = (u - q) / tf.maximum(r, 1e-300)
    monotone = tf.where(s < 0, gamma_max, tf.zeros_like(gamma_max))
    gamma = tf.where((denominator > 0) & (r > 1e-20), stationary, monotone)
    return tf.clip_by_value(gamma, tf.zeros_like(gamma_max), gamma_max)


@keras.saving.register_keras_serializable(package="kmtl")
class CAGrad(Weighting):
    """Conflict-averse gradient descent.

    CAGrad looks for the update `d` that maximises the worst task's
    first-order improvement `min_t g_t . d` within a ball around the mean
    gradient `g_0`: `|d - g_0| <= c |g_0|`. Its dual is a small problem over
    the simplex,

        w = argmin_{w in simplex}  g_w . g_0 + c |g_0| |g_w|,   g_w = G^T w,

    written on the Gram matrix (`g_w . g_0 = w^T K b`, `|g_w|^2 = w^T K w`,
    `b` = uniform weights) and solved in the graph by Frank-Wolfe with an
    exact (closed-form) line search. The update is
    `d = g_0 + c |g_0| / |g_w| * g_w`, i.e.
    `alpha = b + c |g_0| / |g_w| * w`, divided by `1 + c^2` (`rescale=1`,
    the default of the paper's code), `1 + c` (`rescale=2`) or not at all
    (`rescale=0`). With `c = 0` CAGrad is the mean gradient (times 1 for any
    `rescale`). The mean is over the present tasks.

    Args:
        c: radius of the ball, relative to `|g_0|` (>= 0; 0.4 in the paper's
            multi-task experiments).
        rescale: 0, 1 or 2, as above.
        max_iter: Frank-Wolfe iteration cap.
        **kwargs: base `Weighting` arguments (`update_every`, `mode`, `name`).

    Raises:
        ValueError: for a negative or non-finite `c`, an unknown `rescale`
            or a `max_iter` < 1.

    Example:

    >>> import numpy as np
    >>> from kmtl.weighting import CAGrad
    >>> G = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> CAGrad(c=0.0).aggregate(G).numpy()
    array([0.5, 0.5])

    References:
        Liu, Liu, Jin, Stone and Liu. Conflict-Averse Gradient Descent for
        Multi-task Learning. NeurIPS 2021. https://arxiv.org/abs/2110.14048
    """

    level = "gradient"
    gram_based = True

    def __init__(self, c: float = 0.4, rescale: int = 1, max_iter: int = 100, **kwargs):
        super().__init__(**kwargs)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= float(c) < float("inf"):
            raise ValueError(f"`c` must be a finite number >= 0. Received: c={c!r}")
        if rescale not in _RESCALES or isinstance(rescale, bool):
            raise ValueError(f"`rescale` must be 0, 1 or 2. Received: rescale={rescale!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"`max_iter` must be a positive integer. Received: max_iter={max_iter!r}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.max_iter = max_iter

    def weights_from_gram(self, gram, losses, present, step):
        K, _ = _solvers.normalized_gram(gram, present)
        b = _solvers.uniform_weights(present)
        g0_norm = tf.sqrt(tf.maximum(tf.tensordot(b, tf.linalg.matvec(K, b), 1), 0.0))
        radius = self.c * g0_norm
        kb = tf.linalg.matvec(K, b)

        def gradient(w):
            kw = tf.linalg.matvec(K, w)
            return kb + radius * kw / tf.sqrt(tf.tensordot(w, kw, 1) + 1e-20)

        def step_fn(w, d, gamma_max):
            return _line_search(K, b, radius, w, d, gamma_max)

        if self.c > 0:
            w = _solvers.frank_wolfe(gradient, step_fn, present, self.max_iter, 1e-12)
        else:
            w = b
        gw_norm = tf.sqrt(tf.maximum(tf.tensordot(w, tf.linalg.matvec(K, w), 1), 0.0))
        coefficient = tf.where(gw_norm > 1e-12, radius / tf.maximum(gw_norm, 1e-300), tf.zeros_like(radius))
        alpha = b + coefficient * w
        if self.rescale == 1:
            alpha = alpha / (1.0 + self.c**2)
        elif self.rescale == 2:
            alpha = alpha / (1.0 + self.c)
        return tf.cast(alpha, gram.dtype)

    def get_config(self):
        base_config = super().get_config()
        config = {"c": self.c, "rescale": self.rescale, "max_iter": self.max_iter}
        return {**base_config, **config}
