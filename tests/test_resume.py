"""A run killed mid-epoch and restarted ends where an uninterrupted run ends.

Each test runs fresh Python processes (as a user restarting a command does):
the script below trains a tiny digits model with `kmtl.callbacks.fit_resumable`
for several strategies (uncertainty, DWA, RLW, FAMO, with Adam), interrupting and resuming each, and compares the final
weights, optimizer variables, strategy state and history with an uninterrupted
run of the same seed. A real SIGKILL (of the script itself, and of `kmtl train`
while it runs) checks that nothing depends on a clean exit.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy

SCRIPT = r'''
import json, os, shutil, signal, sys
import numpy as np
import keras
import kmtl
from kmtl import callbacks, data, trunks

EPOCHS, BATCH, LIMIT, STEPS = 3, 32, 96, 3  # 3 batches per epoch
STRATEGIES = {
    "uncertainty": "uncertainty",
    "dwa": "dwa",
    "rlw": {"name": "rlw", "seed": 7},
    "famo": "famo",
}


class Interrupt(Exception):
    pass


class Stopper(keras.callbacks.Callback):
    """Stops the process (SIGKILL) or the fit (an exception) after global batch `at`."""

    def __init__(self, at, kill):
        super().__init__()
        self.at, self.kill, self.epoch = at, kill, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.offset = epoch, STEPS - self.params["steps"]

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch * STEPS + self.offset + batch + 1 == self.at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Interrupt()


class Copier(Stopper):
    """Copies the checkpoint aside after global batch `at` (before that batch is saved)."""

    def __init__(self, at, source, directory):
        super().__init__(at, kill=False)
        self.source, self.directory = source, directory

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch * STEPS + self.offset + batch + 1 == self.at:
            os.makedirs(self.directory)
            shutil.copy(os.path.join(self.source, "checkpoint.npz"), self.directory)


def make_dataset(first, skip):
    return data.task_dataset("digits", ["digit", "parity"], split=f"train[:{LIMIT}]", batch_size=BATCH,
                             seed=3, epochs=(first, EPOCHS), skip_batches=skip)


def train(name, directory, stop=None, save_every_steps=1):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = kmtl.build_model(input_shape=(8, 8, 1), trunk=trunks.get("dense:16"),
                             heads=data.task_heads("digits", ["digit", "parity"]))
    # Eager steps: 9 of them cost less than tracing the step (the `kmtl train` test runs graphs).
    model.compile(optimizer=keras.optimizers.Adam(0.01), run_eagerly=True,
                  weighting=kmtl.experiment.build_weighting(STRATEGIES[name]))
    backup = callbacks.BackupAndRestore(directory, save_every_steps=save_every_steps, fingerprint=name)
    history = callbacks.fit_resumable(model, make_dataset, EPOCHS, STEPS, backup,
                                      callbacks=[] if stop is None else [stop], verbose=0)
    return model, history, backup


def snapshot(model, history):
    out = {f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)}
    out.update({f"o{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.optimizer.variables)})
    out.update({f"s_{k}": keras.ops.convert_to_numpy(v) for k, v in model.weighting.state_variables().items()})
    out["history"] = np.array(json.dumps(history))
    return out


def compare(reference, result, label):
    assert sorted(reference) == sorted(result), label
    for key in reference:
        if key == "history":
            a, b = json.loads(str(reference[key])), json.loads(str(result[key]))
            assert sorted(a) == sorted(b), (label, sorted(a), sorted(b))
            for k in a:
                assert len(a[k]) == EPOCHS and np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (label, k, a[k], b[k])
        else:
            assert np.allclose(reference[key], result[key], rtol=1e-5, atol=1e-6), (label, key, reference[key], result[key])


mode, root = sys.argv[1], sys.argv[2]
if mode == "strategies":
    for name in STRATEGIES:
        # The uninterrupted run; after its global batch 8 (epoch 3, batch 2) it keeps a copy of the
        # checkpoint as it then is (saved after batch 1 of epoch 3): what a kill there leaves.
        directory = f"{root}/cut-{name}"
        source = f"{root}/ref-{name}"
        model, history, backup = train(name, source, stop=Copier(8, source, directory))
        assert backup.position() == (EPOCHS, 0)
        reference = snapshot(model, history)
        np.savez(f"{root}/ref-{name}.npz", **reference)
        assert int(model.optimizer.iterations) == EPOCHS * STEPS
        probe = callbacks.BackupAndRestore(directory, fingerprint=name)
        assert probe.position() == (2, 1), probe.position()
        # A save killed half-way leaves a temporary file: it is ignored.
        with open(os.path.join(directory, ".checkpoint.npz.half.tmp"), "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        model, history, backup = train(name, directory)  # a fresh model, as after a restart
        assert int(model.optimizer.iterations) == EPOCHS * STEPS
        compare(reference, snapshot(model, history), name)
        print("resumed exactly:", name, flush=True)
    # Another run's checkpoint, and an unreadable one, are refused with a message naming the file.
    for fingerprint, corrupt in (("other", False), ("famo", True)):
        directory = f"{root}/cut-famo"
        if corrupt:
            with open(os.path.join(directory, "checkpoint.npz"), "wb") as f:
                f.write(b"not a checkpoint")
        try:
            callbacks.BackupAndRestore(directory, fingerprint=fingerprint).position()
            raise AssertionError("accepted")
        except ValueError as error:
            message = str(error)
            assert "checkpoint.npz" in message and ("another run" in message if not corrupt else "cannot be read" in message), message
            print("refused:", message.split(";")[0], flush=True)
    # Last, SIGKILL this process itself mid-epoch (after global batch 5: epoch 2, batch 2).
    train("rlw", f"{root}/killed", stop=Stopper(5, kill=True))
    raise AssertionError("not killed")
elif mode == "resume":  # the same training again, in a new process: it continues and finishes
    model, history, backup = train("rlw", f"{root}/killed")
    compare(dict(np.load(f"{root}/ref-rlw.npz")), snapshot(model, history), "rlw after SIGKILL")
    print("resumed exactly after SIGKILL", flush=True)
'''


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _script(tmp_path, *args, env=None, timeout=400):
    path = tmp_path / "resume_script.py"
    path.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(path), *args, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or _env(),
    )


def test_interrupted_runs_resume_exactly_and_bad_checkpoints_are_refused(tmp_path):
    result = _script(tmp_path, "strategies")
    # The script ends by killing itself (SIGKILL) mid-epoch, after its other checks.
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    for name in ("uncertainty", "dwa", "rlw", "famo"):
        assert f"resumed exactly: {name}" in result.stdout
    assert result.stdout.count("refused:") == 2
    record = numpy.load(tmp_path / "killed" / "checkpoint.npz")["record"]
    checkpoint = json.loads(str(record))
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 1)  # saved after every batch: the 4th
    again = _script(tmp_path, "resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed exactly after SIGKILL" in again.stdout


def _kmtl(*args, **popen):
    return subprocess.Popen(
        [sys.executable, "-m", "kmtl_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        **popen,
    )


def test_kmtl_train_killed_mid_run_resumes_then_is_cached(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "dataset": "digits",
                "epochs": 4,
                "train_limit": 640,
                "batch_size": 32,
                "weighting": "dwa",
                "name": "run",
                "out": str(tmp_path),
                "verbose": 2,
            }
        )
    )
    command = ["train", "--config", str(config), "--seeds", "0"]
    checkpoint = tmp_path / "run" / "seed-0" / "checkpoint" / "checkpoint.npz"
    first = _kmtl(*command)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checkpoint.exists(), first.communicate()
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    second = _kmtl(*command)
    out, err = second.communicate(timeout=400)
    assert second.returncode == 0, out + err
    resumed = re.search(r"kmtl: resuming from .*checkpoint.npz: epoch (\d)/4, (\d+)/20 of its batches", out)
    assert resumed and 2 <= int(resumed.group(1)) <= 4, out  # killed after epoch 1, before the end
    assert out.count("Epoch ") == 5 - int(resumed.group(1)), out  # only the remaining epochs are trained
    history = json.loads((tmp_path / "run" / "seed-0" / "history.json").read_text())
    assert len(history["loss"]) == 4 and len(history["val_loss"]) == 4
    assert not checkpoint.parent.exists()  # a finished run leaves no checkpoint to resume
    third = _kmtl(*command)
    out, err = third.communicate(timeout=200)
    assert third.returncode == 0, out + err
    assert "reusing the cached experiment" in out and "Epoch" not in out, out


def test_epoch_stream_orders_depend_on_seed_and_epoch_only():
    import numpy as np
    import pytest

    from kmtl import data

    def labels(first, skip=0, seed=3, stop=3):
        stream = data.task_dataset(
            "digits",
            ["digit"],
            split="train[:50]",
            batch_size=8,
            seed=seed,
            epochs=(first, stop),
            skip_batches=skip,
        )
        batches = [y["digit"].numpy() for _, y in stream]
        assert len(batches) == int(stream.cardinality())
        return batches

    full = labels(0)
    assert len(full) == 3 * 7 and [len(b) for b in full[:7]] == [8] * 6 + [2]  # no batch spans two epochs
    epochs = [np.concatenate(full[7 * e : 7 * e + 7]) for e in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and not np.array_equal(epochs[0], epochs[1])
    restarted = labels(1, skip=3)  # a fresh dataset object, from epoch 1, batch 3
    assert all(np.array_equal(a, b) for a, b in zip(full[7 + 3 :], restarted)) and len(restarted) == 2 * 7 - 3
    assert not np.array_equal(np.concatenate(labels(0, seed=4)), np.concatenate(full))
    for bad in (
        dict(epochs=(2, 2)),
        dict(epochs=(0, 1), seed=None),
        dict(skip_batches=1),
        dict(epochs=[0, 1.5]),
    ):
        with pytest.raises(ValueError, match="epochs|skip_batches"):
            data.task_dataset("digits", ["digit"], split="train[:50]", batch_size=8, **bad)
