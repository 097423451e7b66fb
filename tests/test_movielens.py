"""Multi-task recommenders on MovieLens as users meet them: real files, the CLI, a fresh process.

- On the real 100,000 ratings: MMoE (rating, liked, watched) and ESMM each beat
  every task's trivial baseline (the mean rating; AUC 0.5) after one epoch.
- The ESMM model, saved as `.keras` and SavedModel, serves pCTR, pCVR and
  pCTCVR by name from raw feature values in a fresh process.
- `kmtl train / evaluate / benchmark movielens` as subprocesses, on small files
  in the GroupLens-free RecBole layout.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import data

ESMM_TASKS = ["rating", "watched", "liked_given_watched", "watched_and_liked"]


@pytest.fixture(scope="module")
def real_files():
    if not data.movielens_available():
        pytest.skip(f"no MovieLens 100K files under {data.data_dir() / 'movielens-100k'} (set KMTL_DATA_DIR)")
    return data.data_dir()


def _train(architecture, tasks, features, epochs=1):
    keras.utils.set_random_seed(0)
    model = kmtl.build_model(
        heads=data.task_heads("movielens", tasks),
        trunk="dense:64,32",
        features=features,
        architecture=architecture,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(data.task_dataset("movielens", tasks, batch_size=512, seed=0), epochs=epochs, verbose=0)
    return model, kmtl.evaluate(model, data.task_dataset("movielens", tasks, split="test", batch_size=2048))


def test_real_movielens_every_task_beats_its_trivial_baseline(real_files, tmp_path_factory):
    features = data.movielens_features()
    train_ratings = data.movielens_arrays(["rating"], "train")[1]["rating"]
    test_ratings = data.movielens_arrays(["rating"], "test")[1]["rating"]
    trivial_rmse = float(np.sqrt(np.mean((test_ratings - train_ratings.mean()) ** 2)))  # about 1.12
    assert 1.05 < trivial_rmse < 1.2

    _, mmoe = _train("mmoe", ["rating", "liked", "watched"], features)
    assert mmoe["rating"]["rmse"] < trivial_rmse - 0.12, mmoe
    assert mmoe["liked"]["auc"] > 0.70 and mmoe["watched"]["auc"] > 0.80, mmoe

    model, esmm = _train("esmm", ESMM_TASKS, features)
    assert esmm["rating"]["rmse"] < trivial_rmse - 0.12, esmm
    assert esmm["liked_given_watched"]["auc"] > 0.70, esmm  # the conversion head, on the rated pairs
    assert esmm["watched"]["auc"] > 0.80 and esmm["watched_and_liked"]["auc"] > 0.80, esmm

    # Saved and served in a fresh process: raw values in, the three probabilities by name out.
    folder = tmp_path_factory.mktemp("esmm")
    kmtl.export.save_keras(model, folder / "model.keras")
    kmtl.export.saved_model(model, folder / "served")
    x = next(iter(data.task_dataset("movielens", ESMM_TASKS, split="test", batch_size=64, shuffle=True)))[0]
    raw = {k: v.numpy() for k, v in x.items()}
    raw = {k: v.astype(str) if v.dtype.kind in "SO" else v for k, v in raw.items()}
    raw["user_id"][0] = "a user never seen"  # out of vocabulary: its OOV embedding
    expected = {k: v.numpy() for k, v in model({k: tf.constant(v) for k, v in raw.items()}).items()}
    np.savez(
        folder / "batch.npz",
        **{f"x_{k}": v for k, v in raw.items()},
        **{f"y_{k}": v for k, v in expected.items()},
    )
    script = textwrap.dedent(
        r"""
        import sys
        import numpy as np
        import tensorflow as tf
        folder = sys.argv[1]
        saved = np.load(f"{folder}/batch.npz")
        x = {k[2:]: saved[k] for k in saved.files if k.startswith("x_")}
        served = tf.saved_model.load(f"{folder}/served").signatures["serving_default"]
        out = served(**{k: tf.constant(v) for k, v in x.items()})
        assert sorted(out) == ["liked_given_watched", "rating", "watched", "watched_and_liked"], sorted(out)
        for name in out:
            np.testing.assert_allclose(out[name].numpy(), saved[f"y_{name}"], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(out["watched_and_liked"], out["watched"] * out["liked_given_watched"], rtol=1e-5)
        import kmtl, keras
        model = keras.saving.load_model(f"{folder}/model.keras")
        assert model.untrained_heads == ("liked_given_watched",)
        again = model.predict({k: tf.constant(v) for k, v in x.items()}, verbose=0)
        for name in again:
            np.testing.assert_allclose(again[name], saved[f"y_{name}"], rtol=1e-5, atol=1e-6, err_msg=name)
        print("SERVED")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "SERVED" in result.stdout, result.stdout + result.stderr[-3000:]


def _kmtl(*args, cwd, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "kmtl_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def test_cli_trains_evaluates_and_benchmarks_movielens(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_movielens import write_recbole

    write_recbole(tmp_path / "data" / "movielens-100k")
    common = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]
    trained = _kmtl(
        "train", "--dataset", "movielens", "--epochs", "1", "--batch-size", "16", "--run-name", "ml", "--verbose", "0",
        "--architecture", "esmm", "--tasks", ",".join(ESMM_TASKS), *common, cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr[-3000:]
    run = tmp_path / "runs" / "ml"
    assert (run / "saved_model" / "saved_model.pb").exists() and (run / "model.keras").exists()
    report = json.loads((run / "metrics.json").read_text())
    assert set(report) - {"overall"} == set(ESMM_TASKS) and "rmse" in report["rating"]

    evaluated = _kmtl("evaluate", str(run / "model.keras"), cwd=tmp_path)
    assert evaluated.returncode == 0 and "watched_and_liked" in evaluated.stdout, evaluated.stderr[-3000:]

    bad = _kmtl("train", "--dataset", "movielens", "--train-limit", "50", *common, cwd=tmp_path)
    assert bad.returncode == 2 and "whole splits" in bad.stderr, bad.stderr

    bench = _kmtl(
        "benchmark", "movielens", "--epochs", "1", "--seeds", "0", "--architectures", "hard_sharing,esmm",
        "--strategies", "equal", *common, cwd=tmp_path,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stdout + bench.stderr[-3000:]
    table = (tmp_path / "runs" / "benchmark-movielens-e1-s1" / "table.md").read_text()
    for row in ("single-task", "hard_sharing + equal", "esmm + equal", "matrix factorisation (reference)"):
        assert f"| {row} |" in table, table
    results = json.loads((tmp_path / "runs" / "benchmark-movielens-e1-s1" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["single-task", "hard_sharing + equal", "esmm + equal"]
    assert all(np.isfinite(r["rating_rmse"]) and 0 <= r["watched_auc"] <= 1 for r in results["rows"])

    again = _kmtl(
        "benchmark", "movielens", "--epochs", "1", "--seeds", "0", "--architectures", "hard_sharing,esmm",
        "--strategies", "equal", *common, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0 and "training hard_sharing" not in again.stdout, again.stdout  # all cached
    unknown = _kmtl("benchmark", "movielens", "--architectures", "mtan", *common, cwd=tmp_path)
    assert unknown.returncode != 0 and "Unknown benchmark architectures ['mtan']" in unknown.stderr, (
        unknown.stderr
    )
