"""Export: TF SavedModel with one named output per head, and `.keras` files.

Example:

>>> kmtl.export.saved_model(model, "saved_models/mnist_mtl")    # doctest: +SKIP
>>> served = kmtl.export.load("saved_models/mnist_mtl")          # doctest: +SKIP
>>> served(images)["digit"].shape                                # doctest: +SKIP
(512, 10)

What an export guarantees
-------------------------
SavedModel, `saved_model(model, path)`, where the platform can create
symbolic links (Linux, macOS; any POSIX file system that has them):

* `path` is a symbolic link to a sibling directory `.<name>.v-<time>-<id>`
  holding one complete SavedModel. An export writes the new model into
  `.<name>.tmp-<pid>-<id>`, checks it (`verify`), flushes it to disk, renames
  it to a new version directory and then replaces the link with one
  `os.replace` (an atomic rename). At every instant `path` resolves to the
  old complete model or to the new one: never to a partial model, never to
  nothing, also when the exporting process is killed at any point.
  `tf.saved_model.load(path)`, `saved_model_cli show --dir path` and TF
  Serving read through the link; `kmtl.export.load` resolves the link once,
  so it never mixes files of two versions.
* The previous version is deleted right after the switch. A reader that
  resolved the link before the switch and is still opening that version's
  files may then fail and should retry (it gets the new model).
* Debris of exports killed earlier (`.<name>.tmp-*`, `.<name>.link-*`,
  version directories no link points to, `.<name>.old-*`, and the
  `.<name>.tmp-*` / `.<name>.old-*` of earlier kmtl releases) is deleted by
  the next export to the same path: only while `path` holds a model (the only
  copy of a model is never deleted), never the version `path` points to, and
  never the temporary directory of an export whose process is still alive.
* Exports into the same parent directory take an advisory lock (`flock` of
  the parent directory) around the clean-up and the switch, so concurrent
  exports never delete each other's versions; the last switch wins.
* Migration, once per path: when `path` is a real directory holding a
  SavedModel (written by an earlier kmtl release or another tool), the first
  export moves it aside and puts the link in its place. Between those two
  renames (microseconds) `path` does not exist; a process killed inside that
  window leaves the old model as `.<name>.old-<pid>-<id>`, kept until an
  export to that path succeeds.
* Never replaced (`FileExistsError`): a file at `path`, or a non-empty
  directory without `saved_model.pb`.
* Without symbolic links (e.g. Windows without developer mode) `path` stays a
  real directory, replaced by two renames on every export, with the same
  short window as the migration.

`.keras` files, `save_keras(model, path)`: the model is written to
`.<stem>.tmp-<pid>-<id>.keras`, flushed, and moved over `path` with
`os.replace`, which is atomic for single files on every platform: `path`
always holds the old or the new complete file. Debris of killed saves is
deleted by the next save to the same path.

A failed export or save (an exception, a failed check) leaves the directory
as it was. Files are flushed with `fsync` before the switch and the parent
directory after it, so after a power cut the path holds the old or the new
model on file systems that honour `fsync`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
import zipfile
from pathlib import Path

import keras
import numpy as np

__all__ = ["saved_model", "load", "ServedModel", "save_keras", "load_keras", "InvalidModelFileError"]


class InvalidModelFileError(ValueError):
    """A model file that is not a complete `.keras` archive (truncated, corrupt, another format)."""


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


# ----------------------------------------------------------------- file plumbing

# Temporary entries this process is writing right now (absolute paths): the
# clean-up of debris must not delete them, although their pid is alive.
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()
_ID = r"[0-9a-f]{8}"


def _token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _writing(tmp: Path):
    key = os.path.abspath(tmp)
    with _ACTIVE_LOCK:
        _ACTIVE.add(key)
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(key)


def _in_use(entry: Path, pid: int | None) -> bool:
    """Whether a temporary entry belongs to an export that is still running."""
    if pid is None:
        return False  # names of earlier kmtl releases carry no pid
    if pid == os.getpid():
        with _ACTIVE_LOCK:
            return os.path.abspath(entry) in _ACTIVE
    if os.name == "nt":  # os.kill would terminate the process: keep the entry
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists
        return True
    return True


@contextlib.contextmanager
def _locked(directory: Path):
    """An advisory exclusive lock of `directory` (a no-op where `flock` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync(path, directory=False) -> None:
    if directory and os.name == "nt":  # pragma: no cover
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory, directory=True)


def _delete(entry: Path) -> None:
    """Removes a file, a symbolic link (never its target) or a directory tree."""
    if os.path.islink(entry) or os.path.isfile(entry):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)
    elif os.path.isdir(entry):
        shutil.rmtree(entry, ignore_errors=True)


def _saved_model_debris(name: str) -> list[re.Pattern]:
    n = re.escape(name)
    return [
        re.compile(rf"^\.{n}\.(?:tmp|old|link)-(?:(?P<pid>\d+)-)?{_ID}$"),
        re.compile(rf"^\.{n}\.v-\d{{8}}T\d{{6}}-{_ID}$"),
    ]


def _keras_debris(path: Path) -> list[re.Pattern]:
    return [
        re.compile(rf"^\.{re.escape(path.stem)}\.tmp-(?:(?P<pid>\d+)-)?{_ID}\.keras$"),
        re.compile(rf"^\.{re.escape(path.name)}\.old-(?:(?P<pid>\d+)-)?{_ID}$"),
    ]


def _clean_debris(path: Path, patterns) -> list[str]:
    """Deletes leftovers of earlier exports to `path`; returns their names.

    Never deletes what `path` resolves to, nor a temporary entry of an
    export that is still running.
    """
    parent = path.parent
    keep = os.path.realpath(path) if os.path.lexists(path) else None
    try:
        entries = sorted(os.listdir(parent))
    except FileNotFoundError:
        return []
    removed = []
    for name in entries:
        match = next((m for m in (p.match(name) for p in patterns) if m), None)
        if match is None:
            continue
        entry = parent / name
        if not os.path.islink(entry) and os.path.realpath(entry) == keep:
            continue
        pid = match.groupdict().get("pid")
        if _in_use(entry, int(pid) if pid else None):
            continue
        _delete(entry)
        removed.append(name)
    return removed


def _holds_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file()


def _check_saved_model_destination(path: Path, overwrite: bool) -> None:
    if path.name in ("", ".", ".."):
        raise ValueError(f"A SavedModel path must name a directory entry. Received: path={path}")
    if os.path.islink(path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it. Received: path={path}")
    elif path.is_dir():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it. Received: path={path}")
        if not _holds_saved_model(path) and any(path.iterdir()):
            raise FileExistsError(
                f"{path} is a directory that holds no SavedModel (no saved_model.pb); refusing to replace "
                f"it. Remove it or export to another path. Received: path={path}"
            )
    elif os.path.lexists(path):
        raise FileExistsError(
            f"{path} is a file, not a SavedModel directory; refusing to replace it. Received: path={path}"
        )


def _install(tmp: Path, path: Path) -> None:
    """Makes the checked SavedModel in `tmp` the one at `path` (see the module docstring)."""
    parent, name = path.parent, path.name
    version = parent / f".{name}.v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    link = parent / f".{name}.link-{_token()}"
    try:
        os.symlink(version.name, link, target_is_directory=True)
    except (OSError, NotImplementedError):  # no symbolic links here: two renames
        _replace_directory(tmp, path)
        return
    switched = False
    try:
        os.rename(tmp, version)
        if os.path.islink(path) or not os.path.lexists(path):
            os.replace(link, path)  # the atomic switch
            switched = True
        else:  # a real directory (earlier kmtl release): migrate it, once
            backup = parent / f".{name}.old-{_token()}"
            os.rename(path, backup)
            try:
                os.replace(link, path)
            except BaseException:
                os.rename(backup, path)
                raise
            switched = True
            _delete(backup)
    except BaseException:
        if not switched:
            _delete(link)
            _delete(version)
        raise
    finally:
        _fsync(parent, directory=True)


def _replace_directory(tmp: Path, path: Path) -> None:
    """Replaces the directory `path` by `tmp` with two renames (no symbolic links)."""
    backup = None
    if os.path.lexists(path):
        backup = path.parent / f".{path.name}.old-{_token()}"
        os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        if backup is not None:
            os.rename(backup, path)
        raise
    if backup is not None:
        _delete(backup)
    _fsync(path.parent, directory=True)


# ----------------------------------------------------------------- SavedModel


def saved_model(
    model: keras.Model,
    path,
    overwrite: bool = True,
    verify: bool = True,
    signature_per_task: bool = False,
) -> Path:
    """Writes a TF SavedModel whose serving signature returns one output per head.

    The `serving_default` signature takes the model input (named `image` for
    single-input models, or one argument per input name; for a model on
    `kmtl.inputs.Features`, one argument per feature with its raw dtype,
    strings included) and returns a dict keyed by head name, equal to
    `model.predict`, for any batch size. The SavedModel needs neither kmtl
    nor Keras to serve: `tf.saved_model.load(path).signatures[...]`, or
    TensorFlow Serving.

    With `signature_per_task=True` it also gets one signature per task,
    `serve_<task>`, that returns only that task's output: for a task-routed
    model it takes only the inputs that task reads (a client of one task
    need not send the others'); for the other architectures it takes the
    shared input and computes only the trunk and that task's head.

    `path` becomes a symbolic link to a complete version directory beside it
    and is switched to the new model atomically; what is guaranteed, also
    when the export is killed, is described in the `kmtl.export` module
    docstring.

    Args:
        model: a built dict-output Keras model.
        path: destination (a SavedModel directory, read through the link).
        overwrite: replace an existing model at `path` (atomically).
        verify: reload the written model and compare it with `model` on a
            random batch (for a feature model, `model.features.example()`),
            every signature, before moving it into place.
        signature_per_task: add a `serve_<task>` signature per head.

    Returns:
        The path written.

    Raises:
        FileExistsError: if `path` exists and `overwrite` is False, or if
            `path` is a file or a non-empty directory without a SavedModel.
        RuntimeError: if the written model does not reproduce `model`.
    """

    if not isinstance(signature_per_task, bool):
        raise TypeError(f"`signature_per_task` must be True or False. Received: {signature_per_task!r}")
    path = Path(path)
    _check_saved_model_destination(path, overwrite)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    debris = _saved_model_debris(path.name)
    if _holds_saved_model(path):  # free the space of killed exports first
        with _locked(parent):
            _clean_debris(path, debris)
    tmp = parent / f".{path.name}.tmp-{_token()}"
    with _writing(tmp):
        try:
            archive = keras.export.ExportArchive()
            archive.track(model)
            specs = _signature_specs(model)
            archive.add_endpoint("serve", _serving_fn(model, specs))
            endpoints = _task_endpoints(model, specs) if signature_per_task else []
            for task, fn in endpoints:
                archive.add_endpoint(f"serve_{task}", fn)
            archive.write_out(str(tmp), verbose=False)
            if verify:
                _verify(model, tmp, specs, [task for task, _ in endpoints])
            _fsync_tree(tmp)
            with _locked(parent):
                _check_saved_model_destination(path, overwrite)
                _install(tmp, path)
                _clean_debris(path, debris)
        except BaseException:
            _delete(tmp)
            raise
    return path


def _task_endpoints(model, specs):
    """`(task, fn)` for the `serve_<task>` endpoints: one head's output each.

    Task-routed models: the task's sub-model on that task's inputs alone.
    Others: the whole input, one output (the other heads are not computed:
    the traced function has no path to them).
    """

    if getattr(model, "architecture", None) == "task_routed":
        from kmtl import architectures

        endpoints = []
        for task, input_names in architectures.task_inputs(model).items():
            sub = architectures.task_submodel(model, task)
            endpoints.append((task, _serving_fn(sub, {n: specs[n] for n in input_names})))
        return endpoints
    return [(task, _serving_fn(model, specs, only=task)) for task in model.output_names]


def _serving_fn(model, specs, only: str | None = None):
    """A traced inference function of `model` for one export endpoint.

    `specs`: a dict of input specs (keyword arguments of the signature) or
    one spec, served as the argument `image`. `only`: keep one output.
    """
    import tensorflow as tf

    def pick(outputs):
        return outputs if only is None else {only: outputs[only]}

    if isinstance(specs, dict):

        @tf.function(input_signature=[specs])
        def serve(inputs):
            return pick(model(inputs, training=False))

        return serve

    @tf.function(input_signature=[specs])
    def serve_image(image):
        return pick(model(image, training=False))

    return serve_image


def _random_batch(specs, size=3):
    rng = np.random.default_rng(0)

    def one(spec):
        return rng.random((size,) + tuple(spec.shape[1:])).astype(spec.dtype.as_numpy_dtype)

    if isinstance(specs, dict):
        return {n: one(s) for n, s in specs.items()}
    return one(specs)


def _verify(model, path, specs, task_signatures=()):
    import tensorflow as tf

    features = getattr(model, "features", None)
    # Raw tabular inputs (strings, ids) need valid values, not random floats.
    batch = features.example(3) if features is not None else _random_batch(specs)
    expected = model(batch, training=False)
    loaded = tf.saved_model.load(str(path))

    def call(name, inputs):
        signature = loaded.signatures[name]
        accepted = signature.structured_input_signature[1]
        if isinstance(inputs, dict):
            return signature(**{k: v for k, v in inputs.items() if k in accepted})
        return signature(image=inputs)

    checks = [("serving_default", list(expected))] + [(f"serve_{t}", [t]) for t in task_signatures]
    for signature, names in checks:
        got = call(signature, batch)
        if sorted(got) != sorted(names):
            raise RuntimeError(
                f"Exported signature {signature!r} has outputs {sorted(got)}, not {sorted(names)}."
            )
        for name in names:
            if not np.allclose(np.asarray(expected[name]), got[name].numpy(), atol=1e-5, rtol=1e-4):
                raise RuntimeError(
                    f"Exported output {name!r} of {signature!r} differs from the model's prediction."
                )


class ServedModel:
    """A loaded kmtl SavedModel: call it with inputs, get `{head: np.ndarray}`.

    Attributes:
        path: the path it was loaded from (as given).
        version_path: the directory actually read (`path` with symbolic
            links resolved once, so a concurrent export never mixes versions).
        module: the object returned by `tf.saved_model.load`.
        signatures: its serving signatures.
    """

    def __init__(self, path):
        import tensorflow as tf

        self.path = Path(path)
        self.version_path = Path(os.path.realpath(path))
        self.module = tf.saved_model.load(str(self.version_path))
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
        expected = sorted(fn.structured_input_signature[1])
        if sorted(inputs) != expected:
            raise ValueError(
                f"Signature {signature!r} takes the inputs {expected}. Received: {sorted(inputs)}"
            )
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
        hint = (
            "; it is a .keras file: use kmtl.export.load_keras"
            if path.is_file() and path.suffix == ".keras"
            else ""
        )
        raise FileNotFoundError(f"No SavedModel at {path} (no saved_model.pb){hint}. Received: path={path}")
    return ServedModel(path)


# ----------------------------------------------------------------- .keras files


def save_keras(model: keras.Model, path, overwrite: bool = True) -> Path:
    """Saves `model` to a `.keras` file atomically (temporary file, then `os.replace`).

    Raises:
        ValueError: if `path` does not end with `.keras`.
        IsADirectoryError: if `path` is a directory.
        FileExistsError: if `path` exists and `overwrite` is False.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"A Keras model file must end with '.keras'. Received: path={path}")
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory; a .keras model is a single file. Received: path={path}"
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it. Received: path={path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{_token()}.keras")
    with _writing(tmp):
        try:
            model.save(str(tmp))
            _fsync(tmp)
            os.replace(tmp, path)  # atomic for a single file
        except BaseException:
            _delete(tmp)
            raise
    _fsync(path.parent, directory=True)
    with _locked(path.parent):
        _clean_debris(path, _keras_debris(path))
    return path


def _check_keras_archive(path: Path) -> None:
    problem = (
        f"{path} is not a valid .keras archive ({{}}); it may be truncated (an interrupted copy, "
        f"download or save) or not a Keras model. Received: path={path}"
    )
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise InvalidModelFileError(problem.format(f"not a complete zip file, {size} bytes"))
    try:
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise InvalidModelFileError(problem.format("a zip file without config.json"))
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as error:
        raise InvalidModelFileError(problem.format(f"unreadable zip: {error}")) from None
    if corrupt is not None:
        raise InvalidModelFileError(problem.format(f"member {corrupt} is corrupt"))


def load_keras(path) -> keras.Model:
    """Loads a `.keras` file written by kmtl (all kmtl objects registered).

    Raises:
        FileNotFoundError: if `path` does not exist.
        IsADirectoryError: if `path` is a directory (e.g. a SavedModel).
        InvalidModelFileError: (a `ValueError`) if the file is not a complete
            `.keras` archive, e.g. truncated or of another format.
    """
    # Every kmtl class is registered already: importing kmtl.export ran kmtl/__init__.py.
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            hint = " (it holds a SavedModel: load it with kmtl.export.load)"
        elif (path / "model.keras").is_file():
            hint = f" (did you mean {path / 'model.keras'}?)"
        else:
            hint = ""
        raise IsADirectoryError(
            f"{path} is a directory, not a .keras model file{hint}. Received: path={path}"
        )
    if not path.exists():
        broken = " (a broken symbolic link)" if os.path.islink(path) else ""
        raise FileNotFoundError(f"No such model file: {path}{broken}")
    if path.suffix == ".keras":
        _check_keras_archive(path)
    try:
        return keras.saving.load_model(str(path))
    except (zipfile.BadZipFile, EOFError, json.JSONDecodeError) as error:
        raise InvalidModelFileError(
            f"{path} is not a valid .keras archive ({type(error).__name__}: {error}). Received: path={path}"
        ) from error
