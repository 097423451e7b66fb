import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import heads, trunks


def _model(tasks):
    model = kmtl.build_model(heads=tasks, trunk=trunks.dense((8,)), input_shape=(4,))
    model.compile(optimizer="sgd")
    return model


def test_cosines_match_a_hand_computed_gram():
    model = _model([heads.Regression("a"), heads.Regression("b"), heads.Regression("c")])
    rng = np.random.default_rng(0)
    x = rng.random((16, 4)).astype("float32")
    y = {
        "a": rng.random(16).astype("float32"),
        "b": rng.random(16).astype("float32"),
        "c": rng.random(16).astype("float32"),
    }
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    cosines = kmtl.diagnostics.gradient_cosines(model, data)
    assert set(cosines) == {("a", "b"), ("a", "c"), ("b", "c")}
    # Reference: full-data gradients of each task's summed per-batch losses.
    grads = {}
    for task in "abc":
        with tf.GradientTape() as tape:
            total = 0.0
            for xb, yb in data:
                pred = model(xb)[task]
                total += tf.reduce_mean(tf.square(tf.squeeze(pred, -1) - yb[task]))
        parts = tape.gradient(total, model.shared_variables)
        grads[task] = np.concatenate([p.numpy().ravel() for p in parts])
    for (a, b), value in cosines.items():
        expected = grads[a] @ grads[b] / np.linalg.norm(grads[a]) / np.linalg.norm(grads[b])
        assert value == pytest.approx(expected, abs=1e-5)


def test_opposite_targets_conflict_and_monitor_logs():
    model = _model([heads.Regression("up"), heads.Regression("down")])
    x = np.ones((8, 4), "float32")
    data = tf.data.Dataset.from_tensor_slices(
        (x, {"up": np.full(8, 5.0, "float32"), "down": np.full(8, -5.0, "float32")})
    ).batch(8)
    # Same head weights: the two gradients differ only in the sign of the residual.
    model.decoders["down"].set_weights(model.decoders["up"].get_weights())
    cosines = kmtl.diagnostics.gradient_cosines(model, data)
    assert cosines[("up", "down")] == pytest.approx(-1.0, abs=1e-5)
    history = model.fit(
        data, epochs=2, verbose=0, callbacks=[kmtl.diagnostics.GradientConflictMonitor(data, every=1)]
    )
    assert len(history.history["cos_up_down"]) == 2


def test_errors():
    model = _model([heads.Regression("a")])
    data = tf.data.Dataset.from_tensor_slices(
        (np.ones((2, 4), "float32"), {"a": np.ones(2, "float32")})
    ).batch(2)
    with pytest.raises(ValueError, match="at least two trained tasks"):
        kmtl.diagnostics.gradient_cosines(model, data)
    with pytest.raises(ValueError, match="every=0"):
        kmtl.diagnostics.GradientConflictMonitor(data, every=0)
