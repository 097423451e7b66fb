"""Explicit epoch orders: the batches of several epochs as one stream, for exact resumption.

A plain training pipeline reshuffles each time it is iterated, from state that
lives inside `tf.data`: a new dataset object starts again at the first epoch's
order. The stream built here instead makes the order of epoch `e` a pure
function of `(seed, e)` (`tf.random.experimental.stateless_shuffle` of the
example indices with seed `[seed, e]`), yields the batches of epochs
`first, ..., stop - 1` one after the other (no batch spans two epochs), and
can start `skip` batches into the first epoch without gathering the batches it
skips (only index batches are skipped). So a run restarted at epoch `e`, step
`k` sees exactly the batches an uninterrupted run saw from there.
"""

from __future__ import annotations

import numpy as np


def check(epochs, skip_batches, seed, batch_size):
    """Checks the `epochs`/`skip_batches` arguments of a pipeline; returns `(first, stop)` or None."""
    if epochs is None:
        if skip_batches:
            raise ValueError(
                f"`skip_batches` needs `epochs=(first, stop)`. Received: skip_batches={skip_batches!r}"
            )
        return None
    if (
        not isinstance(epochs, (tuple, list))
        or len(epochs) != 2
        or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in epochs)
        or not 0 <= epochs[0] < epochs[1]
    ):
        raise ValueError(
            f"`epochs` must be a pair of integers (first, stop) with 0 <= first < stop. Received: epochs={epochs!r}"
        )
    if isinstance(skip_batches, bool) or not isinstance(skip_batches, (int, np.integer)) or skip_batches < 0:
        raise ValueError(f"`skip_batches` must be an integer >= 0. Received: skip_batches={skip_batches!r}")
    if seed is None:
        raise ValueError(
            "`epochs` needs an integer `seed`: the order of each epoch comes from it. Received: seed=None"
        )
    if batch_size is None:
        raise ValueError(
            "`epochs` needs a `batch_size`: the stream is one of batches. Received: batch_size=None"
        )
    return int(epochs[0]), int(epochs[1])


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches in one epoch of `num_examples` examples."""
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def index_batches(num_examples, batch_size, drop_remainder, shuffle, seed, epochs, skip_batches=0):
    """The int64 index batches of epochs `first..stop-1`, epoch `e` ordered by `(seed, e)`.

    The stream has a known cardinality: `(stop - first) * num_batches - skip`
    (never below zero).
    """
    import tensorflow as tf

    first, stop = epochs
    key = tf.constant(int(seed), tf.int64)

    def one_epoch(epoch):
        order = tf.range(num_examples, dtype=tf.int64)
        if shuffle and num_examples > 1:
            order = tf.random.experimental.stateless_shuffle(order, seed=tf.stack([key, epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)

    stream = tf.data.Dataset.range(first, stop).flat_map(one_epoch).skip(int(skip_batches))
    total = max((stop - first) * num_batches(num_examples, batch_size, drop_remainder) - int(skip_batches), 0)
    return stream.apply(tf.data.experimental.assert_cardinality(total))


__all__ = ["check", "index_batches", "num_batches"]
