"""kmtl.weighting._random: stateless draws, the same with and without XLA."""

import numpy as np
import tensorflow as tf

from kmtl.weighting import _random


def _draws(seed, counter, fn, shape, jit=None):
    def draw(count):
        return fn(_random.key(seed, count), shape)

    if jit is not None:
        draw = tf.function(draw, jit_compile=jit)
    return draw(tf.constant(counter, tf.int64)).numpy()


def test_draws_are_pure_functions_of_seed_and_counter_and_xla_gives_the_same_numbers():
    for fn in (_random.uniform, _random.normal):
        a = _draws(7, 3, fn, (5, 4))
        np.testing.assert_array_equal(a, _draws(7, 3, fn, (5, 4)))
        np.testing.assert_array_equal(a, _draws(7, 3, fn, (5, 4), jit=False))
        # The integer hash is bit-identical under XLA; normal's log/cos may differ by an ulp.
        np.testing.assert_allclose(a, _draws(7, 3, fn, (5, 4), jit=True), rtol=1e-6, atol=1e-7)
        if fn is _random.uniform:
            np.testing.assert_array_equal(a, _draws(7, 3, fn, (5, 4), jit=True))
        assert not np.array_equal(a, _draws(7, 4, fn, (5, 4)))
        assert not np.array_equal(a, _draws(8, 3, fn, (5, 4)))
        assert not np.array_equal(a, _draws(7 + 2**32, 3, fn, (5, 4)))  # the seed's high bits count


def test_uniform_and_normal_have_the_right_moments():
    u = _draws(1, 0, _random.uniform, (200_000,))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5e-3 and abs(u.var() - 1 / 12) < 5e-3
    n = _draws(1, 0, _random.normal, (200_000,))
    assert np.isfinite(n).all()
    assert abs(n.mean()) < 1e-2 and abs(n.std() - 1.0) < 1e-2
    # Different streams of one key are independent-looking.
    other = _random.uniform(_random.key(1, tf.constant(0, tf.int64)), (200_000,), stream=1).numpy()
    assert abs(np.corrcoef(u, other)[0, 1]) < 1e-2


def test_orders_are_permutations_and_vary():
    orders = _random.orders(_random.key(3, tf.constant(0, tf.int64)), 6).numpy()
    for row in orders:
        assert sorted(row) == list(range(6))
    seen = {tuple(_random.orders(_random.key(3, tf.constant(c, tf.int64)), 6).numpy()[0]) for c in range(50)}
    assert len(seen) > 30
