import json
import subprocess
import sys

import pytest

from kmtl import cli


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


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["train", "--epochs", "0"], "--epochs must be a positive integer"),
        (["train", "--loss-weights", "digit:1"], "task=weight pairs"),
        (["train", "--tasks", "digit,colour"], "colour"),
        (["train", "--weighting", "nope"], "Unknown weighting strategy 'nope'"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", "/nonexistent-never-written"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"epochs": 1, "colour": "red"}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(config)])
    assert exit_info.value.code == 2 and "Unknown option(s) ['colour']" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "kmtl.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "train" in result.stdout
