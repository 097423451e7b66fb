import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmtl import cli

SCRIPT = Path(sys.executable).parent / "kmtl"


def run_console_script(*args, cwd=None, timeout=120):
    """Runs the installed `kmtl` console script; returns (status, stdout, stderr, imported modules)."""
    if not SCRIPT.exists():
        pytest.skip(f"no installed `kmtl` console script at {SCRIPT} (pip install -e .)")
    if "kmtl_cli" not in SCRIPT.read_text():
        pytest.fail(f"{SCRIPT} does not start kmtl_cli:main; re-run `pip install -e . --no-deps`")
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
    return result.returncode, result.stdout, stderr, imported


def heavy_imports(imported):
    return sorted(
        m
        for m in imported
        if m.split(".")[0] in ("tensorflow", "keras", "kmtl", "numpy", "tensorflow_datasets")
    )


def test_default_train_on_embedded_digits(tmp_path, capsys):
    code = cli.main(["train", "--out", str(tmp_path), "--run-name", "run", "--epochs", "3", "--verbose", "0"])
    assert code == 0
    run = tmp_path / "run"
    for name in (
        "saved_model",
        "model.keras",
        "history.json",
        "metrics.json",
        "metrics.md",
        "curves.png",
        "config.json",
    ):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["digit"]["accuracy"] > 0.5 and metrics["parity"]["accuracy"] > 0.6
    history = json.loads((run / "history.json").read_text())
    assert len(history["digit_loss"]) == 3
    out = capsys.readouterr().out
    assert "digit" in out and "parity" in out
    assert cli.main(["evaluate", str(run / "model.keras"), "--dataset", "digits"]) == 0
    assert cli.main(["export", str(run / "model.keras"), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "saved_model.pb").exists()

    # A run's config.json is a valid --config: the run can be repeated (flags override it).
    capsys.readouterr()
    config = run / "config.json"
    assert cli.main(["train", "--config", str(config), "--run-name", "again", "--epochs", "1"]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["epochs"] == 1 and again["tasks"] == ["digit", "parity"] and again["out"] == str(tmp_path)

    # The console script evaluates a run with no flags, from any directory, using the run's config.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, stdout, stderr, _ = run_console_script(
        "evaluate", str(run / "model.keras"), cwd=elsewhere, timeout=300
    )
    assert code == 0, stderr
    assert "on digits test" in stdout and str(config) in stdout
    assert "digit" in stdout and "parity" in stdout


NONSENSE_FLAGS = [
    (["train", "--learning-rate", "-1"], "--learning-rate must be a finite number > 0. Received: -1.0"),
    (["train", "--learning-rate", "0"], "--learning-rate must be a finite number > 0"),
    (["train", "--learning-rate", "nan"], "--learning-rate must be a finite number > 0. Received: nan"),
    (["train", "--learning-rate", "inf"], "--learning-rate must be a finite number > 0. Received: inf"),
    (["train", "--learning-rate", "fast"], "--learning-rate must be a finite number > 0. Received: 'fast'"),
    (["train", "--train-limit", "0"], "--train-limit must be a positive integer"),
    (["train", "--train-limit", "-5"], "--train-limit must be a positive integer"),
    (["train", "--epoch", "1"], "unrecognized arguments: --epoch 1"),
    (["train", "--epochs", "0"], "--epochs must be a positive integer"),
    (["train", "--epochs", "2.5"], "--epochs must be a positive integer. Received: '2.5'"),
    (["train", "--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["train", "--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
    (
        ["train", "--loss-weights", "digit=nan"],
        "weight of task 'digit' must be a finite number >= 0. Received: nan",
    ),
    (
        ["train", "--loss-weights", "digit=inf"],
        "weight of task 'digit' must be a finite number >= 0. Received: inf",
    ),
    (
        ["train", "--loss-weights", "digit=-1"],
        "weight of task 'digit' must be a finite number >= 0. Received: -1.0",
    ),
    (["train", "--loss-weights", "digit:1"], "task=weight pairs"),
    (["train", "--loss-weights", "digit=1,digit=2"], "task 'digit' is given twice"),
    (["train", "--loss-weights", "colour=1"], "--loss-weights names task(s) ['colour'] that are not trained"),
    (["train", "--loss-weights", "digit=0,parity=0"], "--loss-weights are all 0"),
    (["train", "--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["train", "--verbose", "3"], "invalid choice: 3"),
    (["train", "--run-name", "../elsewhere"], "--run-name must be a plain directory name"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--config", "/nonexistent/run.json"], "--config /nonexistent/run.json does not exist"),
    (["evaluate", "/nonexistent/model.keras"], "No such model file: /nonexistent/model.keras"),
    (["evaluate", "model.keras", "--batch", "8"], "unrecognized arguments: --batch 8"),
    (["evaluate", "model.keras", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["export", "/nonexistent/model.keras", "out"], "No such model file"),
    (["--he"], "the following arguments are required"),
    (["fit"], "invalid choice: 'fit'"),
]


def test_console_script_refuses_nonsense_without_importing_tensorflow(tmp_path):
    """Usage errors exit 2 with `kmtl: error: ...` before TensorFlow (or kmtl) is imported."""
    (tmp_path / "model.keras").write_bytes(b"")
    failures = []
    for argv, message in NONSENSE_FLAGS:
        out = ["--out", str(tmp_path / "never")] if argv[0] == "train" else []
        code, stdout, stderr, imported = run_console_script(*argv, *out, cwd=tmp_path)
        if code != 2 or "kmtl: error: " not in stderr or message not in stderr or heavy_imports(imported):
            failures.append((argv, code, stderr[-300:], heavy_imports(imported)[:3]))
    assert not failures, failures
    assert not (tmp_path / "never").exists()


def test_help_is_fast_and_imports_no_tensorflow():
    for argv in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["export", "--help"]):
        code, stdout, stderr, imported = run_console_script(*argv)
        assert code == 0, stderr
        assert stdout.startswith("usage: kmtl"), stdout
        assert heavy_imports(imported) == [], (argv, heavy_imports(imported)[:5])
    assert "kmtl_cli" in imported


@pytest.mark.parametrize(
    "config,message",
    [
        ({"epochs": "3"}, "\"epochs\" in {path} must be a positive integer. Received: '3' (str)"),
        ({"epochs": 2.0}, '"epochs" in {path} must be a positive integer. Received: 2.0 (float)'),
        (
            {"learning_rate": True},
            '"learning_rate" in {path} must be a finite number > 0. Received: True (bool)',
        ),
        ({"learning_rate": -1}, '"learning_rate" in {path} must be a finite number > 0. Received: -1'),
        ({"learning_rate": float("nan")}, "must be a finite number > 0. Received: nan"),
        ({"train_limit": 0}, '"train_limit" in {path} must be a positive integer'),
        ({"train_limit": -5}, '"train_limit" in {path} must be a positive integer'),
        ({"batch_size": True}, '"batch_size" in {path} must be a positive integer. Received: True (bool)'),
        ({"seed": "0"}, '"seed" in {path} must be an integer'),
        ({"loss_weights": {"digit": -1}}, "the weight of task 'digit' must be a finite number >= 0"),
        (
            {"loss_weights": {"digit": float("inf")}},
            "the weight of task 'digit' must be a finite number >= 0",
        ),
        (
            {"loss_weights": {"digit": "1"}},
            "the weight of task 'digit' must be a number. Received: '1' (str)",
        ),
        ({"loss_weights": "digit=nan"}, "the weight of task 'digit' must be a finite number >= 0"),
        ({"loss_weights": [1, 2]}, "must be a string like 'digit=1,parity=0.5' or an object"),
        ({"tasks": 5}, '"tasks" in {path} must be a comma-separated string or a list'),
        ({"dataset": "cifar"}, "invalid choice: 'cifar'"),
        ({"verbose": 3}, "invalid choice: 3"),
        ({"verbose": True}, "invalid choice: True"),
        ({"out": 7}, '"out" in {path} must be a non-empty string'),
        ({"epochs": 1, "colour": "red"}, "Unknown option(s) ['colour']"),
    ],
)
def test_config_file_values_are_checked_like_flags(config, message, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))  # json writes NaN / Infinity literals, which json.load accepts
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(path), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "kmtl: error: " in err and message.format(path=path) in err, err
    assert not (tmp_path / "never").exists()


def test_config_file_itself_is_checked(tmp_path, capsys):
    cases = {
        "list.json": ("[1, 2]", "must hold a JSON object. Received: list"),
        "broken.json": ('{"epochs": 1', "is not valid JSON"),
        "twice.json": ('{"epochs": 1, "epochs": 2}', "key(s) ['epochs'] appear more than once"),
        "run.yaml": ("epochs: [1\n", "is not valid YAML"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--config", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"kmtl: error: --config {tmp_path / name}" in err, err
        assert message in err, err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(tmp_path)])
    assert exit_info.value.code == 2 and "is a directory, not a JSON file" in capsys.readouterr().err


def test_flags_override_config_values(tmp_path, capsys):
    import kmtl_cli

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 4, "learning_rate": 0.1, "loss_weights": {"digit": 2}}))
    command, options = kmtl_cli.parse(
        ["train", "--config", str(path), "--epochs", "2", "--train-limit", "50"]
    )
    assert command == "train"
    assert options["epochs"] == 2 and options["learning_rate"] == 0.1 and options["train_limit"] == 50
    assert options["loss_weights"] == {"digit": 2.0} and options["tasks"] == ["digit", "parity"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--tasks", "digit,colour"], "colour"),
        (["train", "--weighting", "nope"], "Unknown weighting strategy 'nope'"),
    ],
)
def test_bad_names_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", "/nonexistent-never-written"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "kmtl: error: " in err and message in err


def _save_mnist_shaped_model(path, tasks=("digit", "parity")):
    import kmtl
    from kmtl import data, trunks

    model = kmtl.build_model(
        heads=data.task_heads("mnist", list(tasks)), trunk=trunks.dense((8,)), input_shape=(28, 28, 1)
    )
    model.compile()
    kmtl.export.save_keras(model, path)
    return path


def test_evaluate_uses_the_runs_config(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KMTL_DATA_DIR")  # the data directory must come from the run's config.json
    run = tmp_path / "mnist-run"
    model = _save_mnist_shaped_model(run / "model.keras")
    config = run / "config.json"
    config.write_text(
        json.dumps(
            {"dataset": "mnist", "tasks": ["parity", "digit"], "source": "local", "data_dir": str(mnist_dir)}
        )
    )
    assert cli.main(["evaluate", str(model)]) == 0
    out = capsys.readouterr().out
    assert "on mnist test, tasks ['parity', 'digit']" in out and str(config) in out
    assert "digit" in out and "parity" in out

    # Flags override the run's values.
    config.write_text(
        json.dumps({"dataset": "mnist", "source": "local", "data_dir": str(tmp_path / "no-data")})
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(model)])
    assert exit_info.value.code == 2 and str(tmp_path / "no-data") in capsys.readouterr().err
    assert cli.main(["evaluate", str(model), "--data-dir", str(mnist_dir), "--split", "test[:500]"]) == 0
    assert "on mnist test[:500]" in capsys.readouterr().out

    # A config.json of another model is refused, and a bad value in it names the file.
    config.write_text(json.dumps({"dataset": "mnist", "tasks": ["large"], "data_dir": str(mnist_dir)}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(model)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "it is not this model's run configuration" in err
    config.write_text(json.dumps({"dataset": "mnist", "data_dir": 5}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(model)])
    assert exit_info.value.code == 2 and f'"data_dir" in {config} must be' in capsys.readouterr().err

    # Without a run config the default dataset (digits) does not fit a 28x28 model: a clear message.
    config.unlink()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(model)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "takes inputs of shape (28, 28, 1)" in err and "'digits'" in err


def test_truncated_or_foreign_model_file_is_named(tmp_path, capsys):
    model = _save_mnist_shaped_model(tmp_path / "good.keras")
    data = model.read_bytes()
    (tmp_path / "truncated.keras").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.keras").write_bytes(os.urandom(4096))
    for name in ("truncated.keras", "random.keras"):
        for argv in (
            ["evaluate", str(tmp_path / name)],
            ["export", str(tmp_path / name), str(tmp_path / "out")],
        ):
            with pytest.raises(SystemExit) as exit_info:
                cli.main(argv)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2, err
            assert f"kmtl: error: {tmp_path / name} is not a valid .keras archive" in err, err
            assert "File not found" not in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.keras").write_bytes(data)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is a directory, not a .keras file" in err
    assert f"did you mean {tmp_path / 'run' / 'model.keras'}" in err


def test_strategy_runs_load_evaluate_and_export_in_new_processes(tmp_path, mnist_dir):
    # As a user meets it: `kmtl train` with a weighting strategy (from flags, and
    # from a --config file), then `kmtl evaluate` and `kmtl export`, each its own process.
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps({"dataset": "mnist", "weighting": "uncertainty", "epochs": 1, "train_limit": 1000})
    )
    runs = {
        "pcgrad": [
            "--dataset",
            "mnist",
            "--tasks",
            "digit,parity",
            "--epochs",
            "1",
            "--weighting",
            "pcgrad",
            "--train-limit",
            "1000",
        ],
        "uncertainty": ["--config", str(config)],
    }
    env_args = ["--data-dir", str(mnist_dir), "--verbose", "0", "--out", str(tmp_path)]
    for name, args in runs.items():
        status, out, err, _ = run_console_script("train", *args, *env_args, "--run-name", name, timeout=600)
        assert status == 0, out + err
        model = tmp_path / name / "model.keras"
        status, out, err, _ = run_console_script("evaluate", str(model), "--split", "test[:500]", timeout=300)
        assert status == 0 and "digit" in out and "parity" in out, out + err
        per_task = ["--signature-per-task"] if name == "pcgrad" else []
        status, out, err, _ = run_console_script(
            "export", str(model), str(tmp_path / f"{name}-served"), *per_task, timeout=300
        )
        assert status == 0, out + err
        assert (tmp_path / f"{name}-served" / "saved_model.pb").exists()
        wanted = "serving_default, serve_digit, serve_parity" if per_task else "signatures: serving_default)"
        assert wanted in out, out
