"""kmtl.experiment: configs, their hash, seeds, the cache and `kmtl train --config/--seeds`.

Two seeds are trained for real, once, through the CLI (module fixture); the
cache, force and resume logic is then also checked with a stand-in for
`kmtl.experiment.train_run` that trains nothing.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import kmtl
from kmtl import cli, experiment

EXPERIMENT_YAML = """\
# two seeds of a small digits run
dataset: digits
epochs: 1
batch_size: 32
train_limit: 300
verbose: 0
seeds: [0, 1]
name: exp
validation: "train[:100]"
weighting:
  name: dwa
  temperature: 3.0
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`kmtl train --config exp.yaml --out OUT` with two seeds, in-process; returns (config path, out)."""
    root = tmp_path_factory.mktemp("experiment")
    path = root / "exp.yaml"
    path.write_text(EXPERIMENT_YAML)
    out = root / "out"
    assert cli.main(["train", "--config", str(path), "--out", str(out)]) == 0
    return path, out


def _raise(*args, **kwargs):
    raise AssertionError("train_run must not be called: the experiment is cached")


def test_cli_trains_each_seed_writes_experiment_json_and_then_reuses_it(trained, capsys, monkeypatch):
    path, out = trained
    run_dir = out / "exp"
    record = json.loads((run_dir / "experiment.json").read_text())
    assert record["complete"] and record["hash"] == experiment.config_hash(path)
    assert record["config"]["weighting"] == {"name": "dwa", "temperature": 3.0}
    assert record["config"]["seeds"] == [0, 1] and record["std_ddof"] == 0
    for seed in (0, 1):
        seed_dir = run_dir / f"seed-{seed}"
        for name in (
            "model.keras",
            "saved_model",
            "history.json",
            "metrics.json",
            "metrics.md",
            "curves.png",
        ):
            assert (seed_dir / name).exists(), (seed, name)
        config = json.loads((seed_dir / "config.json").read_text())
        assert config["seed"] == seed and config["validation"] == "train[:100]"
        assert json.loads((seed_dir / "metrics.json").read_text()) == record["per_seed"][str(seed)]
        assert record["seconds_per_epoch"][str(seed)] > 0
        history = json.loads((seed_dir / "history.json").read_text())
        assert "val_digit_accuracy" in history and "digit_weight" in history
    # The two seeds trained different models; the summary is their mean and population std.
    first, second = (record["per_seed"][s] for s in ("0", "1"))
    assert first != second
    for task in ("digit", "parity", "overall"):
        for metric, value in record["mean"][task].items():
            values = np.array([first[task][metric], second[task][metric]])
            np.testing.assert_allclose(value, values.mean())
            np.testing.assert_allclose(record["std"][task][metric], values.std(ddof=0))

    # A second call reuses the cache: it says so and trains nothing.
    capsys.readouterr()
    monkeypatch.setattr(experiment, "train_run", _raise)
    assert cli.main(["train", "--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kmtl: reusing the cached experiment" in printed and "±" in printed


def test_second_run_returns_the_cache_without_training(trained, monkeypatch, capsys):
    path, out = trained
    models = sorted((out / "exp").glob("seed-*/model.keras"))
    assert len(models) == 2
    mtimes = [m.stat().st_mtime_ns for m in models]
    monkeypatch.setattr(experiment, "train_run", _raise)
    result = experiment.run(path, out=out, verbose=2)  # verbose and out do not change the hash
    assert result.from_cache and result.run_dir == out / "exp"
    assert [m.stat().st_mtime_ns for m in models] == mtimes
    assert "reusing the cached experiment" in capsys.readouterr().out
    assert sorted(result.per_seed) == [0, 1] and set(result.seconds_per_epoch) == {0, 1}
    mean, std = experiment.summarize(result.per_seed)
    assert mean == result.mean and std == result.std
    text = str(result)
    assert "digit" in text and "parity" in text and f"{result.mean['digit']['accuracy']:.4f} ±" in text
    assert "ddof=0" in text


def test_another_config_under_the_same_name_is_an_error(trained, monkeypatch):
    path, out = trained
    monkeypatch.setattr(experiment, "train_run", _raise)
    config = experiment.load_config(path)
    with pytest.raises(ValueError, match="another config") as info:
        experiment.run(dict(config, epochs=2), out=out)
    assert "force=True" in str(info.value) and "epochs: 1 -> 2" in str(info.value)


class FakeTraining:
    """Stands in for `kmtl.experiment.train_run`: writes a model.keras and reports seed-dependent metrics."""

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, options, run_dir, **kwargs):
        seed = options["seed"]
        if seed == self.fail_on:
            self.fail_on = None
            raise KeyboardInterrupt("killed")
        self.calls.append(seed)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model.keras").write_bytes(b"model")
        report = kmtl.Report(
            {"digit": {"accuracy": 0.5 + 0.1 * seed, "loss": 1.0 / (seed + 1)}, "parity": {"accuracy": 0.9}},
            {"loss": 2.0 + seed},
        )
        return experiment.TrainedRun(
            run_dir=run_dir, report=report, history={}, seconds_per_epoch=0.25 + seed
        )


SMALL = {"dataset": "digits", "epochs": 1, "train_limit": 300, "batch_size": 32, "name": "fake"}


def test_force_retrains_and_overwrites(tmp_path, monkeypatch, capsys):
    fake = FakeTraining()
    monkeypatch.setattr(experiment, "train_run", fake)
    config = dict(SMALL, seeds=[0, 1, 2])
    first = experiment.run(config, out=tmp_path)
    assert not first.from_cache and fake.calls == [0, 1, 2]
    assert experiment.run(config, out=tmp_path).from_cache and fake.calls == [0, 1, 2]
    forced = experiment.run(config, out=tmp_path, force=True)
    assert not forced.from_cache and fake.calls == [0, 1, 2] * 2
    # Another config under the same name: refused, then retrained with force.
    with pytest.raises(ValueError, match="pass force=True"):
        experiment.run(dict(config, learning_rate=0.01), out=tmp_path)
    assert fake.calls == [0, 1, 2] * 2
    other = experiment.run(dict(config, learning_rate=0.01), out=tmp_path, force=True)
    assert other.hash != first.hash and fake.calls == [0, 1, 2] * 3
    record = json.loads((tmp_path / "fake" / "experiment.json").read_text())
    assert record["hash"] == other.hash and record["config"]["learning_rate"] == 0.01
    # Mean and std (ddof=0) of the per-seed results.
    accuracy = np.array([0.5, 0.6, 0.7])
    np.testing.assert_allclose(other.mean["digit"]["accuracy"], accuracy.mean())
    np.testing.assert_allclose(other.std["digit"]["accuracy"], accuracy.std(ddof=0))
    np.testing.assert_allclose(other.std["overall"]["loss"], np.array([2.0, 3.0, 4.0]).std())
    assert other.std["parity"]["accuracy"] == pytest.approx(0.0)
    assert other.seconds_per_epoch == {0: 0.25, 1: 1.25, 2: 2.25}
    assert not list((tmp_path / "fake").glob("*.tmp"))  # atomic writes leave no temporary file


def test_one_seed_has_zero_std_and_runs_without_a_name_go_to_dataset_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "train_run", FakeTraining())
    config = {key: value for key, value in SMALL.items() if key != "name"}
    result = experiment.run(dict(config, seed=1), out=tmp_path)
    assert result.run_dir == tmp_path / f"digits-{result.hash}" and list(result.per_seed) == [1]
    assert result.std == {
        "digit": {"accuracy": 0.0, "loss": 0.0},
        "parity": {"accuracy": 0.0},
        "overall": {"loss": 0.0},
    }


def test_an_interrupted_experiment_trains_only_the_missing_seeds(tmp_path, monkeypatch):
    fake = FakeTraining(fail_on=1)
    monkeypatch.setattr(experiment, "train_run", fake)
    config = dict(SMALL, seeds=[0, 1])
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, out=tmp_path)
    record = json.loads((tmp_path / "fake" / "experiment.json").read_text())
    assert not record["complete"] and list(record["per_seed"]) == ["0"]
    result = experiment.run(config, out=tmp_path)
    assert fake.calls == [0, 1] and not result.from_cache and sorted(result.per_seed) == [0, 1]


def test_a_directory_of_another_kind_of_run_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "train_run", FakeTraining())
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "model.keras").write_bytes(b"a kmtl train run")
    with pytest.raises(ValueError, match="holds no experiment.json"):
        experiment.run(SMALL, out=tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "experiment.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot be read"):
        experiment.run(dict(SMALL, name="other"), out=tmp_path)


def test_config_hash_is_stable_and_ignores_what_cannot_change_results():
    config = {"dataset": "digits", "epochs": 2, "weighting": {"name": "cagrad", "c": 0.4}}
    digest = experiment.config_hash(config)
    assert len(digest) == 16 and int(digest, 16) >= 0
    reordered = dict(reversed(list(config.items())))
    assert experiment.config_hash(reordered) == digest
    assert experiment.config_hash(dict(config, out="elsewhere", verbose=0, name="x")) == digest
    assert experiment.config_hash(experiment.load_config(config)) == digest  # normalised is idempotent
    assert (
        experiment.config_hash(dict(config, seed=0))
        == digest
        == experiment.config_hash(dict(config, seeds=[0]))
    )
    assert experiment.config_hash(dict(config, tasks=["digit", "parity"], learning_rate=0.001)) == digest
    assert experiment.config_hash(dict(config, epochs=3)) != digest
    assert experiment.config_hash(dict(config, weighting={"name": "cagrad", "c": 0.5})) != digest
    assert experiment.config_hash(dict(config, seeds=[0, 1])) != digest
    assert experiment.config_hash({"weighting": "PCGrad"}) == experiment.config_hash(
        {"weighting": {"name": "pcgrad"}}
    )
    # The same digest as sha256 of the canonical JSON, by hand.
    import hashlib

    normalised = experiment.load_config(config)
    kept = {k: v for k, v in normalised.items() if k not in ("out", "verbose", "name", "tensorboard")}
    assert kept.pop("architecture_options") is None  # left out of the hash when empty
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest
    assert experiment.config_hash(dict(config, architecture_options={})) == digest
    assert experiment.config_hash(dict(config, architecture_options={"shared_depth": 1})) != digest


def test_hashes_of_runs_recorded_before_architecture_options_still_hold():
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full"
    records = sorted(root.glob("*/experiment.json"))[:6]
    assert records, root
    for path in records:
        record = json.loads(path.read_text())
        assert "architecture_options" not in record["config"]
        assert experiment.config_hash(record["config"]) == record["hash"], path


def test_yaml_and_json_files_load_alike(tmp_path):
    (tmp_path / "exp.yaml").write_text(EXPERIMENT_YAML)
    from_yaml = experiment.load_config(tmp_path / "exp.yaml")
    (tmp_path / "exp.json").write_text(json.dumps(from_yaml))
    (tmp_path / "exp.yml").write_text("dataset: digits\nepochs: 1\n")
    assert experiment.load_config(str(tmp_path / "exp.json")) == from_yaml
    assert (
        from_yaml["seeds"] == [0, 1]
        and from_yaml["name"] == "exp"
        and from_yaml["tasks"] == ["digit", "parity"]
    )
    assert list(from_yaml) == list(experiment.KEYS)
    assert experiment.load_config(tmp_path / "exp.yml")["seeds"] == [0]
    assert experiment.load_config({"run_name": "a"})["name"] == "a"


@pytest.mark.parametrize(
    "config,messages",
    [
        (
            {"epochs": 1, "colour": "red"},
            ["Unknown option(s) ['colour']", "'seeds'", "'validation'", "'epochs'"],
        ),
        ({"dataset": "cifar"}, ['"dataset"', "invalid choice: 'cifar'", "'digits'", "'fashion_mnist'"]),
        ({"tasks": ["digit", "colour"]}, ['"tasks"', "['colour']", "['digit', 'parity', 'large', 'value']"]),
        ({"dataset": "fashion_mnist", "tasks": "digit"}, ['"tasks"', "['item', 'group']"]),
        ({"architecture": "tower"}, ['"architecture"', "'hard_sharing'", "'mmoe'", "'tower'"]),
        (
            {"architecture": "mmoe", "architecture_options": {"experts": 2}},
            ['"architecture_options"', "['experts']", "'mmoe'", "['gate_input', 'num_experts']"],
        ),
        ({"architecture_options": [1]}, ['"architecture_options"', "a mapping of option names"]),
        ({"trunk": "resnet"}, ['"trunk"', "lenet, conv, dense", "'resnet'"]),
        ({"weighting": "nope"}, ['"weighting"', "unknown strategy 'nope'", "'pcgrad'", "'cagrad'"]),
        ({"weighting": {"name": "nope"}}, ['"weighting"', "unknown strategy 'nope'", "'mgda'"]),
        (
            {"weighting": {"name": "cagrad", "cc": 0.4}},
            ['"weighting"', "strategy 'cagrad' has no option(s) ['cc']", "'c'", "'update_every'"],
        ),
        ({"weighting": {"name": "cagrad", "c": -1}}, ['"weighting"', "strategy 'cagrad' refused", "c=-1"]),
        ({"weighting": {"c": 0.4}}, ['"weighting"', "non-empty string name"]),
        ({"seeds": [0, 0]}, ['"seeds"', "seed(s) [0] appear more than once"]),
        ({"seeds": []}, ['"seeds"', "a non-empty list of distinct integers"]),
        ({"seeds": [0, "1"]}, ['"seeds"', "Received: '1' (str)"]),
        ({"seed": 1, "seeds": [0]}, ['either "seed" or "seeds"']),
        ({"name": "a", "run_name": "b"}, ['"name" and "run_name"']),
        ({"name": "../up"}, ['"name"', "plain directory name"]),
        ({"validation": "val"}, ['"validation"', "Unknown split", "'val'"]),
        ({"optimizer": "nope"}, ['"optimizer"', "Keras optimizer name", "'nope'"]),
        ({"epochs": 0}, ['"epochs"', "positive integer", "Received: 0"]),
        ({"loss_weights": {"colour": 1}}, ["\"loss_weights\" names task(s) ['colour']"]),
        ({"tensorboard": "yes"}, ['"tensorboard"', "true or false", "'yes' (str)"]),
        ({"train_split": "train[:50]", "train_limit": 10}, ["either train_limit or train_split"]),
        ({"train_split": "test[:50]"}, ["train_split must be a slice of the training split"]),
        ({"test_split": "dev"}, ['"test_split"', "Unknown split", "'dev'"]),
        ({"dataset": "multimnist", "tasks": ["digit"]}, ['"tasks"', "['left', 'right']"]),
    ],
)
def test_bad_configs_name_the_key_and_the_allowed_values(config, messages):
    with pytest.raises(ValueError) as info:
        experiment.load_config(config)
    for message in messages:
        assert message in str(info.value), (message, str(info.value))


def test_bad_files_name_the_file(tmp_path):
    cases = {
        "twice.yaml": ("epochs: 1\nepochs: 2\n", "key(s) ['epochs'] appear more than once"),
        "broken.yaml": ("epochs: [1\n", "is not valid YAML"),
        "list.yml": ("- 1\n", "must hold a YAML mapping"),
        "lr.yaml": ("learning_rate: 1e-3\n", "write 1.0e-3"),
        "broken.json": ('{"epochs": 1', "is not valid JSON"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as info:
            experiment.load_config(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and message in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        experiment.load_config(tmp_path / "missing.yaml")


def test_seeds_flags_are_checked(tmp_path, capsys, monkeypatch):
    import kmtl_cli

    for argv, message in (
        (["--seeds", "0,0"], "--seeds: seed(s) [0] appear more than once"),
        (["--seeds", "0,x"], "--seeds must be an integer"),
        (["--seeds", "0,,1"], "--seeds must be comma-separated seeds"),
        (["--seed", "1", "--seeds", "0,1"], "not allowed with argument"),
    ):
        with pytest.raises(SystemExit) as info:
            kmtl_cli.parse(["train", *argv, "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err, err
    # One seed from --seeds is still an experiment; a one-seed config is a plain run.
    _, options = kmtl_cli.parse(["train", "--seeds", "3", "--force"])
    assert options["experiment"] and options["seeds"] == [3] and options["force"]
    (tmp_path / "one.yaml").write_text("seeds: [4]\n")
    _, options = kmtl_cli.parse(["train", "--config", str(tmp_path / "one.yaml")])
    assert not options["experiment"] and options["seed"] == 4
    _, options = kmtl_cli.parse(["train", "--config", str(tmp_path / "one.yaml"), "--seed", "5"])
    assert not options["experiment"] and options["seed"] == 5 and options["seeds"] is None
    # --seeds runs experiment.run with the flags' options.
    monkeypatch.setattr(experiment, "train_run", FakeTraining())
    assert (
        cli.main(["train", "--seeds", "0,1", "--run-name", "flags", "--out", str(tmp_path), "--epochs", "1"])
        == 0
    )
    record = json.loads((tmp_path / "flags" / "experiment.json").read_text())
    assert record["config"]["seeds"] == [0, 1] and record["config"]["name"] == "flags"
    assert "mean ± std" in capsys.readouterr().out


def test_architecture_options_reach_the_model(tmp_path):
    config = experiment.load_config(
        {"dataset": "digits", "epochs": 1, "architecture": "mmoe", "architecture_options": {"num_experts": 2}}
    )
    options = experiment._seed_options(config, 0, tmp_path)
    model = experiment._build(options)
    assert model.get_config()["architecture_options"] == {"num_experts": 2}
