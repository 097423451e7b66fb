import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import keras
import numpy as np
import pytest

import kmtl
from kmtl import heads, trunks


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


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

    listing = sorted(os.listdir(tmp_path))  # `served` and the version directory it links to
    assert listing == sorted(["served", os.readlink(path)])
    monkeypatch.setattr(tf.saved_model, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        kmtl.export.saved_model(model, tmp_path / "served")
    assert sorted(os.listdir(path)) == before
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary leftovers
    kmtl.export.load(path)


def test_unverifiable_export_is_not_moved_into_place(model, tmp_path, monkeypatch):
    path = kmtl.export.saved_model(model, tmp_path / "served")
    before = sorted(os.listdir(path))

    def mismatch(*args, **kwargs):
        raise RuntimeError("Exported output 'digit' differs from the model's prediction.")

    listing = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(kmtl.export, "_verify", mismatch)
    with pytest.raises(RuntimeError, match="differs"):
        kmtl.export.saved_model(model, tmp_path / "served")
    assert sorted(os.listdir(path)) == before and sorted(os.listdir(tmp_path)) == listing


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
    plain = kmtl.export.load(kmtl.export.saved_model(model, tmp_path / "plain")).signatures
    assert "serving_default" in plain and not [s for s in plain if s.startswith("serve_")]
    served = kmtl.export.load(kmtl.export.saved_model(model, tmp_path / "routed", signature_per_task=True))
    assert {"serving_default", "serve_digit", "serve_item"} <= set(served.signatures)
    with pytest.raises(ValueError, match=r"takes the inputs \['digit'\]"):
        served(
            {"digit": np.zeros((1, 8, 8, 1), "float32"), "item": np.zeros((1, 8, 8, 1), "float32")},
            "serve_digit",
        )
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
    full = model.predict({"digit": x, "item": 1 - x}, verbose=0)
    only_digit = served({"digit": x}, signature="serve_digit")
    assert set(only_digit) == {"digit"}
    np.testing.assert_allclose(only_digit["digit"], full["digit"], atol=1e-6)
    np.testing.assert_allclose(
        served({"item": 1 - x}, signature="serve_item")["item"], full["item"], atol=1e-6
    )


def tiny_model(seed):
    keras.utils.set_random_seed(seed)
    m = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Binary("parity"), heads.Regression("value")],
        trunk=trunks.conv((4,), (8,)),
        input_shape=(8, 8, 1),
    )
    m.compile()
    return m


X = np.random.default_rng(7).random((4, 8, 8, 1)).astype("float32")


def assert_serves(path, model):
    served = kmtl.export.load(path)
    expected = model.predict(X, verbose=0)
    got = served(X)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5)


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_saved_model_path_is_a_link_switched_atomically(model, tmp_path):
    import tensorflow as tf

    path = kmtl.export.saved_model(model, tmp_path / "served")
    first = os.readlink(path)
    assert path.is_symlink() and first.startswith(".served.v-") and "/" not in first
    assert sorted(os.listdir(tmp_path)) == sorted(["served", first])
    assert "serving_default" in tf.saved_model.load(str(path)).signatures  # read through the link
    other = tiny_model(3)
    kmtl.export.saved_model(other, path)
    second = os.readlink(path)
    assert second != first and sorted(os.listdir(tmp_path)) == sorted(
        ["served", second]
    )  # old version deleted
    assert_serves(path, other)
    served = kmtl.export.load(path)
    assert served.path == path and served.version_path == (tmp_path / second).resolve()


_KILLED_EXPORT = textwrap.dedent(
    """
    import os, sys, time
    import keras
    import tensorflow as tf
    import kmtl
    from kmtl import heads, trunks

    path, ready, where = sys.argv[1:]
    keras.utils.set_random_seed(1)
    model = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Binary("parity"), heads.Regression("value")],
        trunk=trunks.conv((4,), (8,)),
        input_shape=(8, 8, 1),
    )
    model.compile()
    # A first export elsewhere: TensorFlow rebinds `tf.saved_model` on its first SavedModel
    # write, which would undo a patch made before it.
    kmtl.export.saved_model(model, os.path.join(os.path.dirname(ready), where + "-warm-up", "served"))

    def hold():
        open(ready, "w").close()
        time.sleep(600)

    if where == "write":  # killed while TensorFlow writes the new SavedModel
        def partial_write(obj, export_dir, *args, **kwargs):
            os.makedirs(os.path.join(export_dir, "variables"), exist_ok=True)
            with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
                f.write(b"partial")
            hold()
        tf.saved_model.save = partial_write
    else:  # killed with the new version complete, just before the link is switched
        real_replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if os.path.abspath(dst) == os.path.abspath(path):
                hold()
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace

    kmtl.export.saved_model(model, path)
    sys.exit("the export finished: the patch did not hold it")
    """
)


def test_killed_export_keeps_the_old_model_and_the_next_export_cleans_up(model, tmp_path):
    paths = {
        where: kmtl.export.saved_model(model, tmp_path / where / "served") for where in ("write", "switch")
    }
    old_targets = {where: os.readlink(path) for where, path in paths.items()}
    script = tmp_path / "killed_export.py"
    script.write_text(_KILLED_EXPORT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    procs = {
        where: subprocess.Popen(
            [sys.executable, str(script), str(path), str(tmp_path / f"{where}.ready"), where],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for where, path in paths.items()
    }
    try:
        deadline = time.monotonic() + 300
        for where, proc in procs.items():
            while not (tmp_path / f"{where}.ready").exists():
                if proc.poll() is not None:
                    pytest.fail(
                        f"export subprocess ({where}) ended ({proc.returncode}): {proc.stderr.read()[-2000:]}"
                    )
                assert time.monotonic() < deadline, f"export subprocess ({where}) never got ready"
                time.sleep(0.1)
        for proc in procs.values():
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
            proc.stderr.close()

    for where, path in paths.items():
        listing = sorted(os.listdir(path.parent))
        debris = [name for name in listing if name not in ("served", old_targets[where])]
        # The path still points to the complete old model; the killed export left debris.
        assert os.readlink(path) == old_targets[where]
        assert_serves(path, model)
        if where == "write":
            assert len(debris) == 1 and debris[0].startswith(f".served.tmp-{procs[where].pid}-"), listing
        else:
            kinds = sorted(name.split("-")[0] for name in debris)
            assert kinds == [".served.link", ".served.v"], listing

    # The next export to the same path switches to the new model and deletes the debris.
    newer = tiny_model(2)
    for path in paths.values():
        kmtl.export.saved_model(newer, path)
        assert sorted(os.listdir(path.parent)) == sorted(["served", os.readlink(path)])
        assert_serves(path, newer)


def test_debris_clean_up_spares_running_exports(model, tmp_path):
    path = kmtl.export.saved_model(model, tmp_path / "served")
    alive, dead = os.getppid(), dead_pid()
    live_tmp = tmp_path / f".served.tmp-{alive}-0123abcd"
    stale = [
        tmp_path / f".served.tmp-{dead}-0123abcd",
        tmp_path / ".served.tmp-89abcdef",  # earlier kmtl releases
        tmp_path / ".served.old-89abcdef",
        tmp_path / ".served.v-20240101T000000-0123abcd",  # a version no link points to
    ]
    for directory in [live_tmp, *stale]:
        directory.mkdir()
        (directory / "saved_model.pb").write_bytes(b"x")
    os.symlink(stale[-1].name, tmp_path / f".served.link-{dead}-0123abcd")
    unrelated = [tmp_path / ".served-notes", tmp_path / ".other.tmp-0123abcd", tmp_path / ".served.tmp-xyz"]
    for file in unrelated:
        file.write_text("keep")
    kmtl.export.saved_model(model, path)
    expected = sorted(["served", os.readlink(path), live_tmp.name, *(f.name for f in unrelated)])
    assert sorted(os.listdir(tmp_path)) == expected
    assert_serves(path, model)


def test_real_directory_is_migrated_to_a_link(model, tmp_path):
    path = tmp_path / "served"
    model.export(str(path), format="tf_saved_model", verbose=False)  # a plain SavedModel directory
    assert path.is_dir() and not path.is_symlink()
    kmtl.export.saved_model(tiny_model(4), path)
    assert path.is_symlink() and sorted(os.listdir(tmp_path)) == sorted(["served", os.readlink(path)])
    (tmp_path / "empty").mkdir()
    kmtl.export.saved_model(model, tmp_path / "empty")  # an empty directory is replaced too
    assert_serves(tmp_path / "empty", model)


def test_a_file_or_a_foreign_directory_is_never_replaced(model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpg")
    with pytest.raises(FileExistsError, match="is a file, not a SavedModel directory"):
        kmtl.export.saved_model(model, tmp_path / "notes.txt")
    with pytest.raises(FileExistsError, match="holds no SavedModel"):
        kmtl.export.saved_model(model, tmp_path / "photos")
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.listdir(tmp_path / "photos") == ["cat.jpg"]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "photos"]


def test_without_symbolic_links_the_directory_is_replaced(model, tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", no_links)
    path = kmtl.export.saved_model(model, tmp_path / "served")
    other = tiny_model(5)
    kmtl.export.saved_model(other, path)
    assert not path.is_symlink() and sorted(os.listdir(tmp_path)) == ["served"]
    assert_serves(path, other)


def test_load_keras_names_bad_files(model, tmp_path):
    good = kmtl.export.save_keras(model, tmp_path / "good.keras")
    data = good.read_bytes()
    (tmp_path / "truncated.keras").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.keras").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.keras").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "not a model")
    corrupt = bytearray(data)
    with zipfile.ZipFile(good) as archive:
        info = archive.getinfo("model.weights.h5")
        name_length, extra_length = np.frombuffer(
            data[info.header_offset + 26 : info.header_offset + 30], "<u2"
        )
        start = info.header_offset + 30 + int(name_length) + int(extra_length)  # the member's data
    corrupt[start + info.compress_size // 2] ^= 0xFF
    (tmp_path / "corrupt.keras").write_bytes(bytes(corrupt))
    for name in ("truncated.keras", "random.keras", "empty.keras", "other.keras", "corrupt.keras"):
        with pytest.raises(kmtl.export.InvalidModelFileError) as info:
            kmtl.export.load_keras(tmp_path / name)
        assert isinstance(info.value, ValueError)
        assert f"{tmp_path / name} is not a valid .keras archive" in str(info.value)
    with pytest.raises(FileNotFoundError, match="No such model file"):
        kmtl.export.load_keras(tmp_path / "missing.keras")
    with pytest.raises(IsADirectoryError, match="is a directory, not a .keras model file"):
        kmtl.export.load_keras(tmp_path)
    served = kmtl.export.saved_model(model, tmp_path / "served")
    with pytest.raises(IsADirectoryError, match="it holds a SavedModel: load it with kmtl.export.load"):
        kmtl.export.load_keras(served)


def test_save_keras_cleans_debris_and_spares_directories(model, tmp_path):
    path = tmp_path / "m.keras"
    stale = [tmp_path / f".m.tmp-{dead_pid()}-0123abcd.keras", tmp_path / ".m.tmp-0123abcd.keras"]
    stale.append(tmp_path / ".m.keras.old-0123abcd")
    live = tmp_path / f".m.tmp-{os.getppid()}-0123abcd.keras"
    for file in [*stale, live]:
        file.write_bytes(b"partial")
    kmtl.export.save_keras(model, path)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.keras", live.name])
    (tmp_path / "d.keras").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        kmtl.export.save_keras(model, tmp_path / "d.keras")
    assert (tmp_path / "d.keras").is_dir()


# A fresh interpreter where `import kmtl` fails (a finder ahead of every path
# refuses it, so neither the checkout nor an installed copy is reachable).
_SERVE_WITHOUT_KMTL = r"""
import importlib.abc, json, sys

class HideKmtl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kmtl" or name.startswith("kmtl."):
            raise ImportError("kmtl is hidden in this process")
        return None

sys.meta_path.insert(0, HideKmtl())
try:
    import kmtl  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("kmtl is importable")
import numpy as np
import tensorflow as tf

out = sys.argv[1]
cases = json.loads(open(f"{out}/cases.json").read())
for name, case in cases.items():
    loaded = tf.saved_model.load(f"{out}/{name}")
    expected = np.load(f"{out}/{name}.npz")
    for size in (1, 5):
        inputs = {k: tf.constant(np.load(f"{out}/{name}-x{size}.npz")[k]) for k in case["inputs"]}
        want = np.load(f"{out}/{name}-y{size}.npz")
        got = loaded.signatures["serving_default"](**inputs)
        assert sorted(got) == sorted(case["heads"]), (name, sorted(got))
        for head in case["heads"]:
            np.testing.assert_allclose(got[head].numpy(), want[head], rtol=1e-5, atol=1e-6, err_msg=name)
            one = loaded.signatures[f"serve_{head}"]
            wanted = sorted(one.structured_input_signature[1])
            assert wanted == sorted(case["task_inputs"][head]), (name, head, wanted)
            alone = one(**{k: inputs[k] for k in wanted})
            assert list(alone) == [head], (name, head, list(alone))
            np.testing.assert_allclose(alone[head].numpy(), want[head], rtol=1e-5, atol=1e-6, err_msg=name)
assert not any(m == "kmtl" or m.startswith("kmtl.") for m in sys.modules)
print("SERVED", sorted(cases))
"""


def test_saved_models_serve_each_head_without_kmtl(tmp_path):
    """Hard sharing, MMoE and task-routed exports, each with a signature per
    task, served in a process where kmtl cannot be imported, for batch sizes 1
    and 5; `saved_model_cli show` lists one output per head."""
    import json

    rng = np.random.default_rng(3)
    task_heads = [heads.Classification("digit", 10), heads.Binary("parity"), heads.Regression("value")]
    cases = {}
    for architecture in ("hard_sharing", "mmoe", "task_routed"):
        keras.utils.set_random_seed(1)
        if architecture == "task_routed":
            names = {"digit": "digit", "parity": "digit", "value": "value"}
            m = kmtl.build_model(
                heads=task_heads,
                inputs={"digit": (8, 8, 1), "value": (8, 8, 1)},
                trunk=trunks.dense((8,)),
                architecture=architecture,
                routes=names,
            )
            inputs = ["digit", "value"]
        else:
            m = kmtl.build_model(
                heads=task_heads, trunk=trunks.dense((8,)), input_shape=(8, 8, 1), architecture=architecture
            )
            names = {h.name: "image" for h in task_heads}
            inputs = ["image"]
        m.compile()
        kmtl.export.saved_model(m, tmp_path / architecture, signature_per_task=True)
        for size in (1, 5):
            x = {k: rng.random((size, 8, 8, 1)).astype("float32") for k in inputs}
            y = m.predict(x if architecture == "task_routed" else x["image"], verbose=0)
            np.savez(tmp_path / f"{architecture}-x{size}.npz", **x)
            np.savez(tmp_path / f"{architecture}-y{size}.npz", **y)
        np.savez(tmp_path / f"{architecture}.npz")
        cases[architecture] = {
            "inputs": inputs,
            "heads": [h.name for h in task_heads],
            "task_inputs": {t: [names[t]] for t in names},
        }
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(
        [sys.executable, "-c", _SERVE_WITHOUT_KMTL, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "SERVED" in result.stdout, result.stdout + result.stderr[-3000:]

    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", str(tmp_path / "task_routed"), "--all"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    blocks = dict((block.split("'", 1)[0], block) for block in shown.stdout.split("signature_def['")[1:])

    def listed(kind, block):
        return sorted(re.findall(rf"{kind}\['([^']+)'\] tensor_info:\s+dtype: \w+\s+shape: \(-1,", block))

    assert listed("outputs", blocks["serving_default"]) == ["digit", "parity", "value"], shown.stdout
    assert listed("inputs", blocks["serving_default"]) == ["digit", "value"], shown.stdout
    for head, source in (("digit", "digit"), ("parity", "digit"), ("value", "value")):
        assert listed("outputs", blocks[f"serve_{head}"]) == [head], shown.stdout
        assert listed("inputs", blocks[f"serve_{head}"]) == [source], shown.stdout
