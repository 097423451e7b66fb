"""`kmtl benchmark`: the CLI as a subprocess on a tiny budget, twice (the second run trains nothing)."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import kmtl
from kmtl import benchmark, cli

SCRIPT = Path(sys.executable).parent / "kmtl"

needs_data = pytest.mark.skipif(
    not kmtl.data.available("multimnist"), reason="needs the MNIST files under $KMTL_DATA_DIR"
)


def _run(*args, timeout=900):
    if not SCRIPT.exists():
        pytest.skip(f"no installed `kmtl` console script at {SCRIPT} (pip install -e .)")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


@needs_data
def test_benchmark_writes_its_table_results_and_plot_and_then_reuses_every_run(tmp_path):
    args = ["benchmark", "multimnist", "--quick", "--train-limit", "400", "--seeds", "0"]
    args += ["--strategies", "equal,mgda_ub", "--out", str(tmp_path)]
    first = _run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    directory = tmp_path / "benchmark-multimnist-e1-s1-n400"
    table = (directory / "table.md").read_text()
    for text in (
        "| single-task |",
        "| static (tuned) (left ",
        "| equal |",
        "| mgda_ub |",
        "Δm (%)",
        "Δp (%)",
    ):
        assert text in table, (text, table)
    assert "97.23 / 95.90" in table and "96.46 / 94.99" in table and "Sener & Koltun 2018" in table
    results = json.loads((directory / "results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    assert methods == ["single-task", "static (tuned)", "equal", "mgda_ub"]
    assert results["budget"] == {"epochs": 1, "seeds": [0], "grid": 4, "train_limit": 400}
    assert results["sweep"]["splits"] == {"train": "train[:360]", "validation": "train[360:400]"}
    for row in results["rows"]:
        assert 0 <= row["left"] <= 100 and 0 <= row["right"] <= 100 and row["seconds_per_epoch"] > 0
    assert results["rows"][0]["delta_m"] == 0.0 and results["training_seconds"] > 0
    header = (directory / "tradeoff.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (825, 528)
    assert "kmtl: benchmark strategy [2/2] mgda_ub" in first.stdout

    again = _run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the cached experiment") == 2 + 3 + 1 + 2  # + the refit
    assert "kmtl: training" not in again.stdout
    assert json.loads((directory / "results.json").read_text())["rows"] == results["rows"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["benchmark", "mnist"], "invalid choice: 'mnist'"),
        (["benchmark", "multimnist", "--epochs", "0"], "--epochs must be a positive integer"),
        (["benchmark", "multimnist", "--seeds", "1,1"], "seed(s) [1] appear more than once"),
        (["benchmark", "multimnist", "--strategies", "equal,"], "--strategies must be comma-separated"),
        (
            ["benchmark", "multimnist", "--strategies", "equal,nope"],
            "Unknown benchmark strategies ['nope']",
        ),
        (["benchmark", "movielens", "--train-limit", "10"], "--train-limit does not apply to movielens"),
        (["benchmark", "multimnist", "--architectures", "mmoe"], "--architectures applies to the movielens"),
    ],
)
def test_bad_benchmark_options_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--out", "/nonexistent-never-written"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_run_checks_its_arguments():
    with pytest.raises(ValueError, match="multimnist"):
        benchmark.run("cifar")
    with pytest.raises(ValueError, match="non-empty list"):
        benchmark.run("multimnist", strategies=[])
    assert set(benchmark.STRATEGIES) >= {
        "equal",
        "uncertainty",
        "gradnorm",
        "mgda_ub",
        "pcgrad",
        "cagrad",
        "nash_mtl",
        "famo",
        "upgrad",
    }


class _Stop(Exception):
    pass


def _recorder(calls):
    def run(config, **kwargs):
        calls.append(kwargs.get("resume", True))
        raise _Stop  # the first run is enough: what it was asked is recorded

    return run


@pytest.mark.parametrize("dataset", ["multimnist", "movielens"])
@pytest.mark.parametrize("flags,resume", [([], True), (["--no-resume"], False)])
def test_no_resume_reaches_the_runs_of_both_benchmarks(dataset, flags, resume, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(kmtl.experiment, "run", _recorder(calls))
    with pytest.raises(_Stop):
        cli.main(["benchmark", dataset, "--quick", *flags, "--out", str(tmp_path)])
    assert calls == [resume]


def test_no_resume_reaches_the_runs_of_the_baselines(tmp_path, monkeypatch):
    config = {"dataset": "digits", "epochs": 1, "seeds": [0], "out": str(tmp_path)}
    for call in (kmtl.evaluation.single_task_baselines, kmtl.evaluation.static_weight_sweep):
        calls = []
        monkeypatch.setattr(kmtl.experiment, "run", _recorder(calls))
        with pytest.raises(_Stop):
            call(config, resume=False)
        assert calls == [False], call
