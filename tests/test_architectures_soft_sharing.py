"""Soft sharing: one trunk per task, kernels tied by an l2 or trace-norm penalty."""

import itertools
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from _architecture_checks import (
    OnesFromGram,
    accuracies,
    assert_partition,
    build,
    digit_parity,
    train,
)

import kmtl
from kmtl import heads, trunks
from kmtl.architectures.soft_sharing import SoftSharedTrunks, tying_penalty
from kmtl.backend.tensorflow.step import shared_task_gradients

SMALL = trunks.conv(filters=(3,), dense_units=(5,))


def _batch(n=16, seed=0, size=8):
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 1)).astype("float32")
    digit = rng.integers(0, 10, n)
    return x, {"digit": digit, "parity": (digit % 2).astype("float32")}


def _small(tasks=("digit", "parity"), **options):
    keras.utils.set_random_seed(0)
    task_heads = [heads.Classification(t, 10) if t == "digit" else heads.Binary(t) for t in tasks]
    return kmtl.build_model(
        heads=task_heads, trunk=SMALL, input_shape=(8, 8, 1), architecture="soft_sharing", **options
    )


def _trunks_layer(model) -> SoftSharedTrunks:
    return model.encoder.get_layer("soft_shared_trunks")


def _numpy_l2(kernels):
    return sum(
        float(np.sum((a.astype("float64") - b.astype("float64")) ** 2))
        for position in kernels
        for a, b in itertools.combinations(position, 2)
    )


def _numpy_trace(kernels):
    return sum(
        float(np.linalg.norm(np.stack([k.reshape(-1) for k in position]).astype("float64"), "nuc"))
        for position in kernels
    )


def _fixed_kernels(model):
    """Sets kernels of very different scales (1e3, 1, 1e-3 by task, x10 by position); returns them."""
    rng = np.random.default_rng(7)
    values = []
    for level, position in enumerate(_trunks_layer(model).kernels()):
        values.append([])
        for t, kernel in enumerate(position):
            value = (rng.standard_normal(kernel.shape) * [1e3, 1.0, 1e-3][t] * 10.0**level).astype("float32")
            kernel.assign(value)
            values[-1].append(value)
    return values


# --- the penalty ------------------------------------------------------------------
@pytest.mark.parametrize("penalty, reference", [("l2", _numpy_l2), ("trace", _numpy_trace)])
def test_penalty_equals_numpy_on_fixed_kernels_of_different_scales(penalty, reference):
    model = _small(("digit", "parity", "odd"), penalty=penalty, strength=0.25)
    kernels = _fixed_kernels(model)
    assert [k.shape for k in kernels[0]] == [(3, 3, 1, 3)] * 3 and len(kernels) == 2
    expected = reference(kernels)
    np.testing.assert_allclose(float(tying_penalty(kernels, penalty)), expected, rtol=1e-5)
    model(np.zeros((2, 8, 8, 1), "float32"))
    (added,) = model.losses
    np.testing.assert_allclose(float(added), 0.25 * expected, rtol=1e-5)


def test_two_tasks_l2_is_the_squared_distance():
    a, b = np.arange(6.0, dtype="float32").reshape(2, 3), np.ones((2, 3), "float32")
    np.testing.assert_allclose(float(tying_penalty([[a, b]], "l2")), np.sum((a - b) ** 2), rtol=1e-6)
    np.testing.assert_allclose(
        float(tying_penalty([[a, b], [a[0], 3 * a[0]]], "trace")),
        np.linalg.norm(np.stack([a.ravel(), b.ravel()]), "nuc")
        + np.linalg.norm(np.stack([a[0], 3 * a[0]]), "nuc"),
        rtol=1e-6,
    )


def test_penalty_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _small(strength=1.0)
        kernels = _fixed_kernels(model)  # squared differences ~1e6 overflow float16
        outputs = model(np.zeros((2, 8, 8, 1), "float32"))
        (added,) = model.losses
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert added.dtype == tf.float32 and all(v.dtype == tf.float32 for v in outputs.values())
    np.testing.assert_allclose(float(added), _numpy_l2(kernels), rtol=1e-5)


# --- structure and options ----------------------------------------------------------
def test_one_trunk_per_task_all_shared_heads_not():
    model = _small()
    assert_partition(model)
    assert not model.supports_representation and model.encoder_stages is None
    shared = [v.path for v in model.shared_variables]
    assert len(shared) == 8 and sum(p.startswith("soft_shared_trunks/digit_trunk") for p in shared) == 4
    assert all(v.path.startswith("digit_") for v in model.task_variables["digit"])
    assert kmtl.architectures.options("soft_sharing") == {"penalty": "l2", "strength": 0.001}
    assert "soft_sharing" in kmtl.architectures.names()


@pytest.mark.parametrize(
    "options, received",
    [
        ({"penalty": "l1"}, "Received: penalty='l1'"),
        ({"strength": -1.0}, "Received: strength=-1.0"),
        ({"strength": float("nan")}, "Received: strength=nan"),
        ({"strength": True}, "Received: strength=True"),
    ],
)
def test_bad_options(options, received):
    with pytest.raises(ValueError) as info:
        _small(**options)
    assert str(info.value).endswith(received)


def test_needs_two_heads():
    with pytest.raises(ValueError, match="two or more tasks") as info:
        kmtl.build_model(heads=[heads.Binary("parity")], input_shape=(8, 8, 1), architecture="soft_sharing")
    assert str(info.value).endswith("Received: heads=['parity']")


def test_representation_mode_is_refused():
    model = _small()
    with pytest.raises(ValueError, match="no single shared representation"):
        model.compile(weighting=kmtl.weighting.get("mgda", mode="representation"))


# --- gradients ------------------------------------------------------------------------
def test_zero_strength_gives_independent_models():
    x, y = _batch()
    model = _small(strength=0.0)
    model(x)
    assert model.losses == []
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    per_task = shared_task_gradients(model, (x, y)).numpy()  # [T, P] over the shared variables
    owner = np.concatenate(
        [np.full(int(np.prod(v.shape)), v.path.split("/")[1].split("_")[0]) for v in model.shared_variables]
    )
    for t, task in enumerate(model.task_names):
        assert np.all(per_task[t][owner != task] == 0) and np.any(per_task[t][owner == task] != 0), task
    # A task without loss keeps its trunk with strength 0; the penalty moves it otherwise.
    for strength in (0.0, 0.5):
        model = _small(strength=strength)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss_weights={"parity": 0.0})
        before = {v.path: v.numpy() for v in model.shared_variables}
        model.train_on_batch(x, y)
        moved = {v.path for v in model.shared_variables if not np.array_equal(before[v.path], v.numpy())}
        parity_kernels = {p for p in before if "parity_trunk" in p and p.endswith("kernel")}
        parity_biases = {p for p in before if "parity_trunk" in p and p.endswith("bias")}
        assert not moved & parity_biases
        assert (moved & parity_kernels == parity_kernels) == (strength > 0), (strength, moved)


@pytest.mark.parametrize("penalty", ["l2", "trace"])
def test_penalty_gradient_enters_the_update_once(penalty):
    """One SGD step, loss level and gradient level, equals `w - lr * grad(sum of task losses + penalty)`."""
    x, y = _batch()
    lr = 0.1
    reference = _small(penalty=penalty, strength=0.5)
    with tf.GradientTape() as tape:
        outputs = reference(x, training=True)
        total = sum(h.loss()(y[h.name], outputs[h.name]) for h in reference.heads) + sum(reference.losses)
    grads = tape.gradient(total, reference.trainable_variables)
    expected = [v.numpy() - lr * g.numpy() for v, g in zip(reference.trainable_variables, grads)]
    for weighting in (None, OnesFromGram(mode="parameters")):
        model = _small(penalty=penalty, strength=0.5)
        model.compile(optimizer=keras.optimizers.SGD(lr), weighting=weighting)
        model.train_on_batch(x, y)
        for v, e in zip(model.trainable_variables, expected, strict=True):
            np.testing.assert_allclose(v.numpy(), e, atol=2e-5, rtol=1e-4, err_msg=f"{weighting} {v.path}")


def _distance(model):
    return sum(float(np.sum((a.numpy() - b.numpy()) ** 2)) for a, b in _trunks_layer(model).kernels())


def _singular_values(model):
    return [
        np.linalg.svd(np.stack([a.numpy().ravel(), b.numpy().ravel()]), compute_uv=False)
        for a, b in _trunks_layer(model).kernels()
    ]


@pytest.mark.parametrize("penalty", ["l2", "trace"])
def test_penalty_alone_moves_the_kernels_as_its_gradient_says(penalty):
    """No task loss, SGD with step `lr * strength = d`, `n` steps, two tasks.

    l2: the difference of the kernels shrinks by `1 - 4d` per step. trace:
    every singular value of `[a; b]` drops by `d` per step (the gradient is
    `U V^T`), as long as it stays positive.
    """
    x, y = _batch(32)
    lr, strength, steps = 0.05, 1.0, 4
    model = _small(penalty=penalty, strength=strength)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss_weights={"digit": 0.0, "parity": 0.0})
    distance, singular = _distance(model), _singular_values(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == steps
    if penalty == "l2":
        np.testing.assert_allclose(
            _distance(model), distance * (1 - 4 * lr * strength) ** (2 * steps), rtol=1e-4
        )
    else:
        for got, start in zip(_singular_values(model), singular, strict=True):
            np.testing.assert_allclose(got, start - steps * lr * strength, rtol=1e-4)


def test_large_strength_pulls_corresponding_kernels_together():
    x, y = _batch(32)
    for strength in (5.0, 0.0):
        model = _small(strength=strength)
        model.compile(optimizer=keras.optimizers.SGD(0.02))
        start = _distance(model)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        if strength:
            assert _distance(model) < 0.05 * start, (start, _distance(model))
        else:
            assert _distance(model) > 0.9 * start, (start, _distance(model))


# --- serialization, fresh process -------------------------------------------------------
LOAD = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import kmtl
    from kmtl.architectures.soft_sharing import SoftSharedTrunks

    out = sys.argv[1]
    saved = np.load(f"{out}/saved.npz")
    x = saved["x"]
    model = keras.saving.load_model(f"{out}/model.keras")
    assert isinstance(model, kmtl.MultiTaskModel)
    assert model.architecture_options == {"penalty": "trace", "strength": 0.01}, model.architecture_options
    layer = model.encoder.get_layer("soft_shared_trunks")
    assert isinstance(layer, SoftSharedTrunks) and layer.penalty == "trace" and layer.strength == 0.01
    prediction = model.predict(x, verbose=0)
    for key, value in prediction.items():
        np.testing.assert_allclose(value, saved[f"pred_{key}"], rtol=1e-5, atol=1e-6, err_msg=key)
    model(x)
    np.testing.assert_allclose(float(model.losses[0]), float(saved["penalty"]), rtol=1e-5)
    # The layer alone round-trips through its config.
    again = SoftSharedTrunks.from_config(json.loads(json.dumps(layer.get_config())))
    assert again.get_config() == layer.get_config()

    # Under MirroredStrategy (two CPUs) a loss-level fit equals the single-device fit: the
    # penalty enters once per global batch (tests/test_distribute_every.py runs the gradient level).
    y = {"digit": saved["label_digit"], "parity": saved["label_parity"]}
    def fit(scope):
        with scope.scope():
            keras.utils.set_random_seed(3)
            model = kmtl.build_model(
                heads=[kmtl.heads.Classification("digit", 10), kmtl.heads.Binary("parity")],
                trunk=kmtl.trunks.conv((3,), (5,)), input_shape=(8, 8, 1), architecture="soft_sharing",
                strength=0.5)
            model.compile(optimizer=keras.optimizers.SGD(0.05))
        history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=2, verbose=0)
        return model.get_weights(), history.history["loss"]
    w1, h1 = fit(tf.distribute.OneDeviceStrategy("/cpu:0"))
    w2, h2 = fit(tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()))
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(h1, h2, rtol=1e-4)
    print("LOADED")
    """
)


def test_keras_round_trip_in_a_fresh_process(tmp_path):
    x, y = _batch(16, seed=1)
    model = _small(penalty="trace", strength=0.01)
    model.compile(optimizer="adam")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    prediction = model.predict(x, verbose=0)
    model(x)
    labels = {f"label_{k}": v for k, v in y.items()}
    np.savez(
        tmp_path / "saved.npz",
        x=x,
        penalty=float(model.losses[0]),
        **labels,
        **{f"pred_{k}": v for k, v in prediction.items()},
    )
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "LOADED" in result.stdout, result.stdout + result.stderr[-3000:]


# --- real data ------------------------------------------------------------------------
def test_learns_mnist_digit_and_parity(mnist_dir):
    model = train(build("soft_sharing", strength=1e-3), digit_parity("train"))
    scores = accuracies(model, *digit_parity("test", 1000))
    assert scores["digit"] > 0.6, scores  # chance: 0.1
    assert scores["parity"] > 0.7, scores  # chance: 0.5
    assert float(_trunks_layer(model).penalty_value()) > 0
    assert json.dumps(model.architecture_options) == '{"strength": 0.001}'
