"""Stateless, backend-neutral random numbers for the strategies that draw them.

A draw is a pure function of `(seed, counter)`: the counter is a state
variable of the strategy (`draws`), advanced by the step only when the batch
is accepted. So the numbers are reproducible for a seed, identical on every
replica, identical with and without XLA (plain integer ops, unlike the
backends' own stateless kernels), and a reloaded or resumed strategy
continues the same sequence.

The generator hashes `(seed, counter, stream, index)` with the lowbias32
integer mixer; 24 bits of the hash give a uniform float32 in [0, 1).
"""

from __future__ import annotations

import math

from keras import ops

_MASK32 = 0xFFFFFFFF


def _mix(x):
    """lowbias32 on int64 tensors holding 32-bit values."""
    x = ops.bitwise_xor(x, ops.right_shift(x, 16))
    x = ops.bitwise_and(x * 0x7FEB352D, _MASK32)
    x = ops.bitwise_xor(x, ops.right_shift(x, 15))
    x = ops.bitwise_and(x * 0x846CA68B, _MASK32)
    return ops.bitwise_xor(x, ops.right_shift(x, 16))


def _fold(key, value):
    value = ops.bitwise_and(ops.cast(value, "int64"), _MASK32)
    return _mix(ops.bitwise_xor(key, _mix(value)))


def key(seed: int, counter):
    """Scalar int64 key of draw number `counter` (a tensor) for `seed` (a Python int)."""
    count = ops.cast(counter, "int64")
    base = _fold(ops.convert_to_tensor(seed & _MASK32, "int64"), seed >> 32)
    return _fold(_fold(base, ops.right_shift(count, 32)), count)


def _bits(draw_key, size, stream: int):
    """`[size]` int64 hashes (32-bit values) of `(draw_key, stream, index)`."""
    return _fold(_fold(draw_key, stream), ops.arange(size, dtype="int64"))


def _size(shape):
    size = 1
    for dim in shape:
        size = size * dim
    return size


def uniform(draw_key, shape, stream: int = 0):
    """Uniform float32 in [0, 1) of `shape`: a pure function of `(draw_key, stream)`."""
    bits = _bits(draw_key, _size(shape), stream)
    values = ops.cast(ops.right_shift(bits, 8), "float32") * (2.0**-24)
    return ops.reshape(values, shape)


def normal(draw_key, shape, stream: int = 0):
    """Standard normal float32 of `shape` (Box-Muller on two uniform streams)."""
    u1 = 1.0 - uniform(draw_key, shape, 2 * stream + 1)  # in (0, 1]
    u2 = uniform(draw_key, shape, 2 * stream + 2)
    return ops.sqrt(-2.0 * ops.log(u1)) * ops.cos((2.0 * math.pi) * u2)


def orders(draw_key, num_tasks: int):
    """`[T, T]` int32: row i is a random permutation of the tasks (used by PCGrad and GradVac).

    Row i sorts the uniform numbers `uniform(draw_key, (T, T))[i]`; equal
    numbers (rare: 24 bits) are ordered by column, so the permutation is the
    same on every backend and with or without XLA.
    """
    bits = ops.right_shift(_bits(draw_key, num_tasks * num_tasks, 0), 8)
    column = ops.tile(ops.arange(num_tasks, dtype="int64"), (num_tasks,))
    keys = ops.reshape(bits * num_tasks + column, (num_tasks, num_tasks))
    return ops.cast(ops.argsort(keys, axis=1), "int32")


__all__ = ["key", "normal", "orders", "uniform"]
