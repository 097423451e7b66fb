"""`kmtl.distributed.fit`: two workers on 127.0.0.1 under MultiWorkerMirroredStrategy, and its checks.

The two-worker test starts real worker processes, each with its own
`TF_CONFIG` (as on a cluster), on ports picked at run time; every process is
bounded by a timeout and killed if it overruns or a peer fails (a worker
whose peer died would wait in a collective forever). The argument checks and
the single-process resume run in this process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import heads, trunks

WORKER = textwrap.dedent(
    r'''
    """python worker.py OUT EPOCHS CHECKPOINTS CRASH, with TF_CONFIG set: one worker of the cluster.

    The test also runs `run(...)` in its own process, without a strategy, as
    the one-process reference.
    """
    import json, os, sys
    import tensorflow as tf
    if __name__ == "__main__":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # first, before other TF ops
    import numpy as np
    import keras
    import kmtl
    from kmtl import heads, trunks

    GLOBAL, STEPS = 16, 3

    def dataset_fn(context):
        # Element-wise shards, then per-replica batches: at step k the workers'
        # batches together are the global batch k of the one-process run.
        rng = np.random.default_rng(0)
        n = GLOBAL * STEPS
        digit = rng.integers(0, 10, n)
        x = rng.random((n, 8, 8, 1)).astype("float32")
        y = {"digit": digit, "parity": (digit % 2).astype("float32")}
        w = {"digit": np.ones(n, "float32"), "parity": (rng.random(n) < 0.6).astype("float32")}  # masked task
        ds = tf.data.Dataset.from_tensor_slices((x, y, w)).repeat()
        ds = ds.shard(context.num_input_pipelines, context.input_pipeline_id)
        return ds.batch(context.get_per_replica_batch_size(GLOBAL), drop_remainder=True)

    class Crash(keras.callbacks.Callback):
        """Dies like a killed machine: mid-epoch, after updates the last checkpoint lacks."""
        def __init__(self, at):
            super().__init__()
            self.at = at
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if [self.epoch, batch] == self.at:
                os._exit(3)

    def run(out, epochs, checkpoints, crash, strategy):
        results = {}
        for name, make in (("pcgrad", lambda: kmtl.weighting.PCGrad(seed=1)), ("uncertainty", kmtl.weighting.Uncertainty)):
            with strategy.scope() if strategy else tf.name_scope("one_process"):
                keras.utils.set_random_seed(3)
                model = kmtl.build_model(heads=[heads.Classification("digit", 10), heads.Binary("parity")],
                                         trunk=trunks.dense((16,)), input_shape=(8, 8, 1))
                model.compile(optimizer=keras.optimizers.Adam(0.01), weighting=make())
            history = kmtl.distributed.fit(model, dataset_fn, epochs=epochs, steps_per_epoch=STEPS, verbose=2,
                                           checkpoint_dir=os.path.join(checkpoints, name),
                                           callbacks=[Crash(crash)] if crash else None)
            results[name] = {
                "weights": [v.tolist() for v in model.get_weights()],
                "state": [np.asarray(v).tolist() for v in model.weighting.weights],
                "iterations": int(model.optimizer.iterations.numpy()),
                "history": history.history,
                "epochs": history.epoch,
            }
        with open(out, "w") as f:
            json.dump(results, f)

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), strategy)
    '''
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, label, args, tf_config=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp_path / "scratch"))
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    log = open(tmp_path / f"{label}.log", "w")
    out = str(tmp_path / f"{label}.json")
    process = subprocess.Popen(
        [sys.executable, str(tmp_path / "worker.py"), out, *map(str, args)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return label, process


def _workers(tmp_path, label, args):
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    return [
        _start(tmp_path, f"{label}{i}", args, {"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(2)
    ]


def _wait(tmp_path, processes, expected, timeout=400):
    """Waits for every process; kills them all on a timeout or an unexpected exit.

    `expected[label]`: the exit code, or "nonzero" for any failure.
    """
    deadline = time.monotonic() + timeout

    def ok(label, code):
        return code != 0 if expected[label] == "nonzero" else code == expected[label]

    try:
        while any(p.poll() is None for _, p in processes):
            failed = [label for label, p in processes if p.poll() is not None and not ok(label, p.poll())]
            assert not failed and time.monotonic() < deadline, (
                failed or "timeout",
                _logs(tmp_path, processes),
            )
            time.sleep(0.2)
        codes = {label: p.returncode for label, p in processes}
        assert all(ok(label, code) for label, code in codes.items()), (codes, _logs(tmp_path, processes))
    finally:
        for _, p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def _logs(tmp_path, processes):
    return "\n".join(
        f"--- {label}\n" + (tmp_path / f"{label}.log").read_text()[-3000:] for label, _ in processes
    )


def test_two_workers_train_like_one_process_and_resume_after_a_crash(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "scratch").mkdir()
    checkpoints = tmp_path / "checkpoints"
    # Two workers that die in the second epoch of the PCGrad run (before the
    # Uncertainty run); one process on the same global batches, uninterrupted.
    crashed = _workers(tmp_path, "crashed", [2, checkpoints, "[1, 1]"])
    try:
        # The reference runs here (TensorFlow is imported already) while the workers run.
        namespace = {"__name__": "kmtl_worker"}
        exec(compile(WORKER, "worker.py", "exec"), namespace)
        namespace["run"](
            str(tmp_path / "reference.json"), 2, str(tmp_path / "reference_checkpoints"), None, None
        )
    finally:
        # Each worker exits at the crash point (code 3), unless its peer exited
        # first while it still waited in that step's collective (then it fails).
        _wait(tmp_path, crashed, {"crashed0": "nonzero", "crashed1": "nonzero"})
        assert 3 in [p.returncode for _, p in crashed], _logs(tmp_path, crashed)
    assert sorted(os.listdir(checkpoints)) == ["pcgrad"]
    assert tf.train.latest_checkpoint(str(checkpoints / "pcgrad")).endswith("ckpt-1")
    # The same command again: PCGrad resumes from epoch 1, Uncertainty trains from scratch.
    resumed = _workers(tmp_path, "resumed", [2, checkpoints, "null"])
    _wait(tmp_path, resumed, {"resumed0": 0, "resumed1": 0})

    one = json.loads((tmp_path / "reference.json").read_text())
    workers = [json.loads((tmp_path / f"resumed{i}.json").read_text()) for i in range(2)]
    for name in ("pcgrad", "uncertainty"):
        first, second = workers[0][name], workers[1][name]
        for a, b in zip(first["weights"], second["weights"]):
            np.testing.assert_array_equal(a, b, err_msg=name)
        for a, b in zip(first["weights"] + first["state"], one[name]["weights"] + one[name]["state"]):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        assert first["iterations"] == one[name]["iterations"] == 6, name
        assert first["epochs"] == [0, 1] and first["history"].keys() == one[name]["history"].keys(), name
        for key, values in one[name]["history"].items():
            np.testing.assert_allclose(first["history"][key], values, atol=1e-4, err_msg=f"{name} {key}")
        assert first["history"]["loss"][1] < first["history"]["loss"][0], name
        assert {"digit_loss", "parity_loss", "parity_weight", "digit_accuracy"} <= first["history"].keys()
    # Only the chief prints; the other worker's checkpoints were temporary.
    assert "Epoch 2/2" in (tmp_path / "resumed0.log").read_text()
    assert "Epoch 2/2" not in (tmp_path / "resumed1.log").read_text()
    assert not [p for p in os.listdir(tmp_path / "scratch") if p.startswith("kmtl-worker")]


# --- in this process: one process, no cluster -------------------------------------------
def _model(seed=3, weighting=None):
    keras.utils.set_random_seed(seed)
    model = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Binary("parity")],
        trunk=trunks.dense((8,)),
        input_shape=(4,),
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), weighting=weighting)
    return model


def _dataset_fn(repeat=True):
    rng = np.random.default_rng(1)
    digit = rng.integers(0, 10, 32)
    x = rng.random((32, 4)).astype("float32")
    y = {"digit": digit, "parity": (digit % 2).astype("float32")}

    def make(context):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        ds = ds.repeat() if repeat else ds
        return ds.shard(context.num_input_pipelines, context.input_pipeline_id).batch(
            context.get_per_replica_batch_size(8)
        )

    return make


def test_one_process_fit_resumes_and_a_finished_run_is_kept(tmp_path):
    fit = kmtl.distributed.fit
    straight = _model()
    expected = fit(straight, _dataset_fn(), epochs=3, steps_per_epoch=2, verbose=0)
    first = _model()
    fit(first, _dataset_fn(), epochs=1, steps_per_epoch=2, verbose=0, checkpoint_dir=str(tmp_path))
    resumed = _model(seed=9)  # other initial weights: the checkpoint overrides them
    history = fit(
        resumed, _dataset_fn(), epochs=3, steps_per_epoch=2, verbose=0, checkpoint_dir=str(tmp_path)
    )
    assert int(resumed.optimizer.iterations.numpy()) == 6
    assert history.epoch == [0, 1, 2] and history.history.keys() == expected.history.keys()
    for key, values in expected.history.items():
        np.testing.assert_allclose(history.history[key], values, atol=1e-5, err_msg=key)
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    again = _model(seed=5)
    kept = fit(again, _dataset_fn(), epochs=3, steps_per_epoch=2, verbose=0, checkpoint_dir=str(tmp_path))
    assert kept.history == history.history and int(again.optimizer.iterations.numpy()) == 6
    for a, b in zip(again.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    other = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Binary("parity")], input_shape=(4,)
    )
    other.compile(optimizer="adam")
    with pytest.raises(ValueError, match="does not fit"):
        fit(other, _dataset_fn(), epochs=3, steps_per_epoch=2, verbose=0, checkpoint_dir=str(tmp_path))


def test_fit_rejects_bad_input_before_training(monkeypatch):
    fit = kmtl.distributed.fit
    model = _model()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="epochs"):
        fit(model, _dataset_fn(), epochs=0, steps_per_epoch=1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        fit(model, _dataset_fn(), epochs=1, steps_per_epoch=None)
    with pytest.raises(TypeError, match="dataset_fn"):
        fit(model, "data", epochs=1, steps_per_epoch=1)
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        fit(model, lambda context: [1, 2], epochs=1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="compiled"):
        fit(
            kmtl.build_model(heads=[heads.Binary("parity")], input_shape=(4,)),
            _dataset_fn(),
            epochs=1,
            steps_per_epoch=1,
        )
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        with pytest.raises(ValueError, match="outside the scope"):
            fit(model, _dataset_fn(), epochs=1, steps_per_epoch=1)
    cluster = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    with pytest.raises(ValueError, match="cluster of 2 tasks"):
        fit(model, _dataset_fn(), epochs=1, steps_per_epoch=1)
    monkeypatch.delenv("TF_CONFIG")
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations.numpy()) == 0
    with pytest.raises(ValueError, match="ran out"):
        fit(model, _dataset_fn(repeat=False), epochs=2, steps_per_epoch=4, verbose=0)
