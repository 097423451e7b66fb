import os

import keras
import numpy as np
import pytest

import kmtl
from kmtl import heads, trunks


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Binary("parity"), heads.Regression("value")],
        trunk=trunks.conv((4,), (8,)),
        input_shape=(8, 8, 1),
    )
    m.compile()
    return m


def test_saved_model_outputs_equal_predict(model, tmp_path):
    import tensorflow as tf

    path = kmtl.export.saved_model(model, tmp_path / "served")
    x = np.random.default_rng(1).random((5, 8, 8, 1)).astype("float32")
    expected = model.predict(x, verbose=0)
    raw = tf.saved_model.load(str(path)).signatures["serving_default"](image=tf.constant(x))
    assert set(raw) == {"digit", "parity", "value"}
    served = kmtl.export.load(path)
    for name in expected:
        np.testing.assert_allclose(raw[name].numpy(), expected[name], atol=1e-5)
        np.testing.assert_allclose(served(x)[name], expected[name], atol=1e-5)
    assert served.input_names == ["image"]


def test_failed_export_keeps_older_model(model, tmp_path, monkeypatch):
    path = kmtl.export.saved_model(model, tmp_path / "served")
    before = sorted(os.listdir(path))

    import tensorflow as tf

    def half_written(obj, export_dir, *args, **kwargs):
        os.makedirs(export_dir, exist_ok=True)
        with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        kmtl.export.saved_model(model, tmp_path / "served")
    assert sorted(os.listdir(path)) == before
    assert sorted(os.listdir(tmp_path)) == ["served"]  # no temporary leftovers
    kmtl.export.load(path)


def test_unverifiable_export_is_not_moved_into_place(model, tmp_path, monkeypatch):
    path = kmtl.export.saved_model(model, tmp_path / "served")
    before = sorted(os.listdir(path))

    def mismatch(*args, **kwargs):
        raise RuntimeError("Exported output 'digit' differs from the model's prediction.")

    monkeypatch.setattr(kmtl.export, "_verify", mismatch)
    with pytest.raises(RuntimeError, match="differs"):
        kmtl.export.saved_model(model, tmp_path / "served")
    assert sorted(os.listdir(path)) == before and sorted(os.listdir(tmp_path)) == ["served"]


def test_no_overwrite_and_missing(model, tmp_path):
    kmtl.export.saved_model(model, tmp_path / "a")
    with pytest.raises(FileExistsError):
        kmtl.export.saved_model(model, tmp_path / "a", overwrite=False)
    with pytest.raises(FileNotFoundError, match="No SavedModel"):
        kmtl.export.load(tmp_path / "nothing")


def test_keras_file_round_trip_and_atomicity(model, tmp_path, monkeypatch):
    path = kmtl.export.save_keras(model, tmp_path / "m.keras")
    restored = kmtl.export.load_keras(path)
    x = np.zeros((2, 8, 8, 1), "float32")
    for a, b in zip(model.predict(x, verbose=0).values(), restored.predict(x, verbose=0).values()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    size = path.stat().st_size

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(type(model), "save", broken)
    with pytest.raises(RuntimeError):
        kmtl.export.save_keras(model, path)
    assert path.stat().st_size == size and sorted(os.listdir(tmp_path)) == ["m.keras"]
    with pytest.raises(ValueError, match="must end with '.keras'"):
        kmtl.export.save_keras(model, tmp_path / "m.h5")


def test_task_routed_export_serves_each_task_alone(tmp_path):
    model = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Classification("item", 10)],
        inputs={"digit": (8, 8, 1), "item": (8, 8, 1)},
        trunk=trunks.dense((8,)),
        architecture="task_routed",
    )
    model.compile()
    served = kmtl.export.load(kmtl.export.saved_model(model, tmp_path / "routed"))
    assert {"serving_default", "serve_digit", "serve_item"} <= set(served.signatures)
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
    full = model.predict({"digit": x, "item": 1 - x}, verbose=0)
    only_digit = served({"digit": x}, signature="serve_digit")
    assert set(only_digit) == {"digit"}
    np.testing.assert_allclose(only_digit["digit"], full["digit"], atol=1e-6)
    np.testing.assert_allclose(
        served({"item": 1 - x}, signature="serve_item")["item"], full["item"], atol=1e-6
    )
