"""Shared checks of the architecture tests (not a test module itself).

Real MNIST subsets from `$KMTL_DATA_DIR`, a small conv trunk, and the checks
every architecture must pass: accuracy above chance, a partition of the
trainable variables into shared and task variables, `.keras` and SavedModel
round trips, and gradient-level weighting.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import heads, trunks
from kmtl.weighting import Weighting

DATA_DIR = Path(os.environ.get("KMTL_DATA_DIR", "/work/shared/data"))
TRUNK = trunks.conv(filters=(4, 8), dense_units=(16,))
NUM_TRAIN, NUM_TEST = 2000, 1000


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def images_and_labels(dataset: str = "mnist", split: str = "train", count: int = NUM_TRAIN):
    """The first `count` images (float32 in [0, 1], `[n, 28, 28, 1]`) and labels."""
    prefix = "train" if split == "train" else "t10k"
    folder = DATA_DIR / dataset
    if not (folder / f"{prefix}-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no {dataset} IDX files under {folder}")
    images = _idx(folder / f"{prefix}-images-idx3-ubyte.gz")[:count]
    labels = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz")[:count]
    return (images[..., None] / 255.0).astype("float32"), labels.astype("int32")


def digit_parity(split: str = "train", count: int = NUM_TRAIN):
    """`(x, {"digit": y, "parity": y % 2})` from real MNIST."""
    x, y = images_and_labels("mnist", split, count)
    return x, {"digit": y, "parity": (y % 2).astype("float32")}


def task_heads():
    return [heads.Classification("digit", num_classes=10), heads.Binary("parity")]


def build(architecture: str, **options) -> kmtl.MultiTaskModel:
    keras.utils.set_random_seed(0)
    return kmtl.build_model(
        heads=task_heads(), trunk=TRUNK, input_shape=(28, 28, 1), architecture=architecture, **options
    )


def train(model, data, epochs: int = 2, batch_size: int = 64):
    x, y = data
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def accuracies(model, x, y) -> dict:
    predictions = model.predict(x, batch_size=500, verbose=0)
    result = {}
    for name, target in y.items():
        p = predictions[name]
        guess = p.argmax(-1) if p.shape[-1] > 1 else (p[:, 0] > 0.5).astype(target.dtype)
        result[name] = float(np.mean(guess == target))
    return result


# --- structure -----------------------------------------------------------------
def assert_partition(model):
    """Shared and task variables are disjoint and cover every trainable variable."""
    shared = [id(v) for v in model.shared_variables]
    task = {t: [id(v) for v in vs] for t, vs in model.task_variables.items()}
    owned = shared + [i for ids in task.values() for i in ids]
    assert len(owned) == len(set(owned)), "a variable belongs to two parts"
    assert set(owned) == {id(v) for v in model.trainable_variables}
    assert shared and all(task.values())


# --- serialization -------------------------------------------------------------
def assert_keras_round_trip(model, x, tmp_path):
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.architecture == model.architecture
    assert loaded.architecture_options == model.architecture_options
    expected = model.predict(x, verbose=0)
    got = loaded.predict(x, verbose=0)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6)
    return loaded


def export_and_load(model, path):
    """Exports a SavedModel and returns its serving function `{input: x} -> {head: y}`."""
    try:
        from kmtl.export import saved_model
    except ImportError:
        saved_model = None
    if saved_model is not None:
        saved_model(model, path)
        loaded = tf.saved_model.load(str(path))
        return lambda inputs: loaded.signatures["serving_default"](**inputs)
    model.export(str(path), format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(str(path))
    return lambda inputs: loaded.serve(inputs if len(inputs) > 1 else next(iter(inputs.values())))


def assert_saved_model_matches(model, inputs: dict, tmp_path):
    """`inputs`: `{signature argument: array}` (`{"image": x}` for one input)."""
    serve = export_and_load(model, tmp_path / "saved_model")
    got = serve({k: tf.constant(v) for k, v in inputs.items()})
    expected = model.predict(inputs if len(inputs) > 1 else next(iter(inputs.values())), verbose=0)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(np.asarray(got[name]), expected[name], atol=1e-5)


# --- gradient-level weighting ------------------------------------------------------
@keras.saving.register_keras_serializable(package="kmtl_tests")
class OnesFromGram(Weighting):
    """A gram-based gradient-level strategy with weights 1: equals equal weighting."""

    level = "gradient"
    gram_based = True

    def weights_from_gram(self, gram, values, present, step, state):
        return keras.ops.ones((keras.ops.shape(gram)[0],), "float32"), {}


def assert_gradient_level_equals_equal_weighting(
    make_model, x, y, mode: str = "parameters", sample_weight=None
):
    """One SGD step with `OnesFromGram` equals one step with static equal weights."""
    reference = make_model()
    candidate = make_model()
    candidate.set_weights(reference.get_weights())
    reference.compile(optimizer=keras.optimizers.SGD(0.5))
    candidate.compile(optimizer=keras.optimizers.SGD(0.5), weighting=OnesFromGram(mode=mode))

    def parts(model):  # the network's weights (the candidate also tracks its strategy's state)
        return [np.array(w) for part in [model.encoder, *model.decoders.values()] for w in part.get_weights()]

    before = parts(reference)
    reference.train_on_batch(x, y, sample_weight=sample_weight)
    candidate.train_on_batch(x, y, sample_weight=sample_weight)
    moved = False
    for b, r, c in zip(before, parts(reference), parts(candidate), strict=True):
        np.testing.assert_allclose(c, r, atol=2e-5, rtol=1e-4)
        moved = moved or not np.allclose(b, r)
    assert moved, "the step changed no weight"
