"""In-graph label checks, and the translation of their failures into `kmtl.errors.LabelError`."""

from __future__ import annotations

import contextlib
import re

import tensorflow as tf

from kmtl.errors import LabelError

_PATTERN = re.compile(r"assertion failed: \[(Head .*?\.)\] \[min:\] \[([^\]]*)\] \[max:\] \[([^\]]*)\]")


def check_label_range(target, low, high, integer: bool, message: str):
    """Returns `target` made to depend on the check `low <= target <= high` (integers if asked).

    The dependency orders the check before every op that reads the returned
    tensor, so a loss kernel never sees an out-of-range label first (an
    assertion that nothing depends on may run after, or concurrently with,
    the loss). Not for XLA-compiled steps: XLA cannot compile assertions.
    """
    values = tf.cast(target, tf.float32)
    ok = tf.logical_and(tf.reduce_all(values >= low), tf.reduce_all(values <= high))
    if integer:
        ok = tf.logical_and(ok, tf.reduce_all(tf.equal(values, tf.round(values))))
    empty = tf.equal(tf.size(values), 0)
    smallest = tf.where(empty, 0.0, tf.reduce_min(values))
    largest = tf.where(empty, 0.0, tf.reduce_max(values))
    check = tf.debugging.Assert(ok, [message, "min:", smallest, "max:", largest], summarize=1)
    with tf.control_dependencies([check]):
        return tf.identity(target)


@contextlib.contextmanager
def translate_errors(model):
    """Turns the failure of a label check into `LabelError` (a `ValueError`).

    After any error the model's cached step functions are dropped, so that a
    corrected call traces afresh.
    """
    try:
        yield
    except BaseException as error:
        model.train_function = model.test_function = model.predict_function = None
        if not isinstance(error, tf.errors.InvalidArgumentError):
            raise
        match = _PATTERN.search(str(error).replace("\\'", "'"))
        if match is None:
            raise
        raise LabelError(
            f"{match.group(1)} Received: labels with min={match.group(2)}, max={match.group(3)}"
        ) from None


__all__ = ["check_label_range", "translate_errors"]
