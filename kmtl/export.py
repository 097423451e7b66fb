"""Export: TF SavedModel with one named output per head, and `.keras` files.

Both writers are atomic: they write into a temporary sibling directory or
file, check it, and only then move it into place. A failed export leaves no
half-written model and does not touch an older model at the same path.

Example:

>>> kmtl.export.saved_model(model, "saved_models/mnist_mtl")    # doctest: +SKIP
>>> served = kmtl.export.load("saved_models/mnist_mtl")          # doctest: +SKIP
>>> served(images)["digit"].shape                                # doctest: +SKIP
(512, 10)
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import keras
import numpy as np


def _signature_specs(model):
    import tensorflow as tf

    inputs = model.inputs
    if isinstance(model.input, dict) or len(inputs) > 1:
        names = list(model.input.keys()) if isinstance(model.input, dict) else [t.name for t in inputs]
        tensors = list(model.input.values()) if isinstance(model.input, dict) else inputs
        return {
            n: tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=n) for n, t in zip(names, tensors)
        }
    tensor = inputs[0]
    return tf.TensorSpec((None,) + tuple(tensor.shape[1:]), tensor.dtype, name="image")


def _replace(tmp: Path, path: Path) -> None:
    """Moves `tmp` to `path`, keeping the old content until the move is done."""
    backup = None
    if path.exists() or path.is_symlink():
        backup = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, backup)
    try:
        os.replace(tmp, path)
    except BaseException:
        if backup is not None:
            os.replace(backup, path)
        raise
    if backup is not None:
        if backup.is_dir():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink(missing_ok=True)


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


def saved_model(model: keras.Model, path, overwrite: bool = True, verify: bool = True) -> Path:
    """Writes a TF SavedModel whose serving signature returns one output per head.

    The `serving_default` signature takes the model input (named `image` for
    single-input models, or one argument per input name) and returns a dict
    keyed by head name, equal to `model.predict`. Models with several
    inputs (task-routed) also get one signature per task, `serve_<task>`,
    that takes only that task's input.

    Args:
        model: a built dict-output Keras model.
        path: destination directory.
        overwrite: replace an existing model at `path` (atomically).
        verify: reload the written model and compare it with `model` on a
            random batch before moving it into place.

    Returns:
        The path written.

    Raises:
        FileExistsError: if `path` exists and `overwrite` is False.
        RuntimeError: if the written model does not reproduce `model`.
    """

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it. Received: path={path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        specs = _signature_specs(model)
        if isinstance(specs, dict):
            archive.add_endpoint("serve", _serving_fn(model, [specs]))
            for task, fn in _task_endpoints(model, specs):
                archive.add_endpoint(f"serve_{task}", fn)
        else:
            archive.add_endpoint("serve", lambda image: model(image, training=False), input_signature=[specs])
        archive.write_out(str(tmp), verbose=False)
        if verify:
            _verify(model, tmp, specs)
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _task_endpoints(model, specs):
    """`serve_<task>` endpoints of task-routed models: one task's input alone."""

    if getattr(model, "architecture", None) != "task_routed":
        return []
    from kmtl import architectures

    endpoints = []
    for task, input_names in architectures.task_inputs(model).items():
        sub = architectures.task_submodel(model, task)
        sig = [{n: specs[n] for n in input_names}]
        endpoints.append((task, _serving_fn(sub, sig)))
    return endpoints


def _serving_fn(model, signature):
    """A traced inference function of `model` for one export endpoint."""
    import tensorflow as tf

    @tf.function(input_signature=signature)
    def serve(inputs):
        return model(inputs, training=False)

    return serve


def _random_batch(specs, size=3):
    rng = np.random.default_rng(0)

    def one(spec):
        return rng.random((size,) + tuple(spec.shape[1:])).astype(spec.dtype.as_numpy_dtype)

    if isinstance(specs, dict):
        return {n: one(s) for n, s in specs.items()}
    return one(specs)


def _verify(model, path, specs):
    import tensorflow as tf

    batch = _random_batch(specs)
    expected = model(batch, training=False)
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]
    got = signature(**batch) if isinstance(batch, dict) else signature(image=batch)
    for name, value in expected.items():
        if name not in got:
            raise RuntimeError(f"Exported SavedModel lacks output {name!r}; it has {sorted(got)}.")
        if not np.allclose(np.asarray(value), got[name].numpy(), atol=1e-5, rtol=1e-4):
            raise RuntimeError(f"Exported output {name!r} differs from the model's prediction.")


class ServedModel:
    """A loaded kmtl SavedModel: call it with inputs, get `{head: np.ndarray}`.

    Attributes:
        module: the object returned by `tf.saved_model.load`.
        signatures: its serving signatures.
    """

    def __init__(self, path):
        import tensorflow as tf

        self.path = Path(path)
        self.module = tf.saved_model.load(str(path))
        self.signatures = dict(self.module.signatures)
        self._default = self.signatures["serving_default"]
        self.input_names = sorted(self._default.structured_input_signature[1])
        self.output_names = sorted(self._default.structured_outputs)

    def __call__(self, inputs, signature: str = "serving_default") -> dict:
        import tensorflow as tf

        if signature not in self.signatures:
            raise ValueError(f"Unknown signature {signature!r}. Available: {sorted(self.signatures)}")
        fn = self.signatures[signature]
        if not isinstance(inputs, dict):
            names = sorted(fn.structured_input_signature[1])
            if len(names) != 1:
                raise ValueError(
                    f"This signature takes a dict with keys {names}. Received: {type(inputs).__name__}"
                )
            inputs = {names[0]: inputs}
        tensors = {
            k: tf.convert_to_tensor(v, dtype=fn.structured_input_signature[1][k].dtype)
            for k, v in inputs.items()
        }
        return {k: v.numpy() for k, v in fn(**tensors).items()}


def load(path) -> ServedModel:
    """Loads a SavedModel written by `saved_model` for inference.

    Raises:
        FileNotFoundError: if `path` holds no SavedModel.
    """
    path = Path(path)
    if not (path / "saved_model.pb").exists():
        raise FileNotFoundError(f"No SavedModel at {path} (no saved_model.pb). Received: path={path}")
    return ServedModel(path)


def save_keras(model: keras.Model, path, overwrite: bool = True) -> Path:
    """Saves `model` to a `.keras` file atomically (temp file, then rename).

    Raises:
        ValueError: if `path` does not end with `.keras`.
        FileExistsError: if `path` exists and `overwrite` is False.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"A Keras model file must end with '.keras'. Received: path={path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it. Received: path={path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.keras")
    try:
        model.save(str(tmp))
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def load_keras(path) -> keras.Model:
    """Loads a `.keras` file written by kmtl (all kmtl objects registered)."""
    import kmtl  # noqa: F401  (registers every kmtl class)

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such model file: {path}")
    return keras.saving.load_model(str(path))


__all__ = ["saved_model", "load", "ServedModel", "save_keras", "load_keras"]
