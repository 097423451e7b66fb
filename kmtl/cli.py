"""The `kmtl` command: train, evaluate and export multi-task models.

    kmtl train                      # embedded digits data, offline, seconds
    kmtl train --dataset mnist --tasks digit,parity --epochs 3 --weighting pcgrad
    kmtl train --config run.json    # the same options from a JSON (or .yaml) file
    kmtl train --config exp.yaml --seeds 0,1,2     # an experiment: one run per seed, mean ± std
    kmtl evaluate saved_models/<run>/model.keras     # the run's dataset and tasks
    kmtl export saved_models/<run>/model.keras saved_models/<run>/served

A run writes `saved_models/<run-name>/`: `saved_model` (TF SavedModel),
`model.keras`, `history.json`, `metrics.json`, `metrics.md`, `curves.png`
and `config.json`. With several seeds (`--seeds`, or `seeds` in the config)
`kmtl train` runs `kmtl.experiment.run`: one such run per seed in
`<run>/seed-<s>/` and `<run>/experiment.json` with the per-seed metrics and
their mean and std; an experiment whose config hash and seeds are already
there is not trained again (`--force` retrains it). Bad options exit with
status 2 and `kmtl: error: ...`.

Parsing and the checks of plain values live in the top-level module
`kmtl_cli` (standard library only, so that `kmtl --help` and usage errors
never import TensorFlow); this module runs a parsed command. `main(argv)` is
the in-process entry point and uses the same parser.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import kmtl_cli
from kmtl_cli import DEFAULT_TASKS, TRAIN_DEFAULTS, UsageError

__all__ = ["DEFAULT_TASKS", "TRAIN_DEFAULTS", "TrainedRun", "UsageError", "main", "run", "train_run"]


def _build(options, data):
    import keras

    import kmtl
    from kmtl import trunks

    shape = data.input_shape(options["dataset"])
    trunk = options["trunk"]
    if trunk is None:
        trunk = trunks.conv((16, 32), (64,)) if shape[0] <= 8 else trunks.conv((32, 64), (128,))
    else:
        trunk = trunks.get(trunk)
    heads = data.task_heads(options["dataset"], options["tasks"])
    model = kmtl.build_model(
        heads=heads, trunk=trunk, input_shape=shape, architecture=options["architecture"]
    )
    optimizer = keras.optimizers.get(
        {"class_name": options["optimizer"], "config": {"learning_rate": options["learning_rate"]}}
    )
    weighting = options["weighting"]
    if isinstance(weighting, dict):  # {"name": strategy, option: value} from a config file
        from kmtl import experiment

        weighting = experiment.build_weighting(weighting)
    model.compile(optimizer=optimizer, loss_weights=options["loss_weights"], weighting=weighting)
    return model


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """What `train_run` trained and wrote.

    Attributes:
        run_dir: the directory it wrote.
        report: the `kmtl.Report` of the model on the test split.
        history: `model.fit`'s `history.history`.
        seconds_per_epoch: wall-clock seconds of an epoch of `fit`, mean over
            the epochs (the first one includes tracing; validation included).
    """

    run_dir: Path
    report: object
    history: dict
    seconds_per_epoch: float


def train_run(options: dict, run_dir: str | os.PathLike) -> TrainedRun:
    """Trains one run, one seed, as `kmtl train` does, and writes `run_dir`.

    Trains on `options["dataset"]`'s training split (its first
    `train_limit` examples), validates on `options.get("validation")` (default:
    the test split), evaluates on the test split and writes `model.keras`,
    `saved_model/`, `history.json`, `metrics.json`, `metrics.md`,
    `curves.png` and `config.json` (the options, a valid `--config`).
    `kmtl train` and `kmtl.experiment.run` (once per seed) both call it.

    Args:
        options: checked options with every key of `kmtl_cli.TRAIN_DEFAULTS`
            (a single `seed`) and optionally `validation`.
        run_dir: the directory to write.

    Returns:
        A `TrainedRun`.
    """
    import keras

    import kmtl
    from kmtl import data, export, plots

    run_dir = Path(run_dir)
    keras.utils.set_random_seed(options["seed"])
    common = dict(source=options["source"], data_dir=options["data_dir"])
    split = "train" if not options["train_limit"] else f"train[:{int(options['train_limit'])}]"
    train = data.task_dataset(
        options["dataset"],
        options["tasks"],
        split=split,
        batch_size=options["batch_size"],
        seed=options["seed"],
        **common,
    )
    test = data.task_dataset(options["dataset"], options["tasks"], split="test", batch_size=512, **common)
    validation = test
    if options.get("validation") is not None:
        validation = data.task_dataset(
            options["dataset"], options["tasks"], split=options["validation"], batch_size=512, **common
        )
    model = _build(options, data)
    print(
        f"kmtl: training {options['architecture']} on {options['dataset']} tasks "
        f"{options['tasks']} for {options['epochs']} epochs -> {run_dir}"
    )
    verbose = options["verbose"]
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    timer = _epoch_timer()
    history = model.fit(
        train, validation_data=validation, epochs=options["epochs"], verbose=verbose, callbacks=[timer]
    )
    report = kmtl.evaluate(model, test)
    print(report)
    run_dir.mkdir(parents=True, exist_ok=True)
    export.save_keras(model, run_dir / "model.keras")
    export.saved_model(model, run_dir / "saved_model")
    _write_json(run_dir / "history.json", history.history)
    _write_json(run_dir / "metrics.json", report.to_dict())
    _write_text(run_dir / "metrics.md", report.to_markdown() + "\n")
    config = {key: options[key] for key in TRAIN_DEFAULTS}
    config["validation"] = options.get("validation")
    if config["data_dir"] is not None:  # so that `kmtl evaluate` finds the data from any directory
        config["data_dir"] = os.path.abspath(os.path.expanduser(config["data_dir"]))
    _write_json(run_dir / "config.json", config)
    import matplotlib

    matplotlib.use("Agg")
    fig = plots.plot_history(history)
    fig.savefig(run_dir / "curves.png", dpi=100)
    print(
        f"kmtl: wrote {run_dir}/ (saved_model/, model.keras, history.json, metrics.json, metrics.md, curves.png)"
    )
    seconds = sum(timer.seconds) / len(timer.seconds) if timer.seconds else float("nan")
    return TrainedRun(
        run_dir=run_dir, report=report, history=dict(history.history), seconds_per_epoch=seconds
    )


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Records the wall-clock seconds of each epoch (validation included)."""

        def __init__(self):
            super().__init__()
            self.seconds = []
            self._start = None

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _train(options) -> int:
    if options.get("experiment"):
        return _train_experiment(options)
    run_name = options["run_name"] or f"{options['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    train_run(options, Path(options["out"]) / run_name)
    return 0


def _train_experiment(options) -> int:
    from kmtl import experiment

    config = {key: options[key] for key in kmtl_cli.CONFIG_KEYS if key in options and key != "seed"}
    result = experiment.run(config, force=options["force"])
    print(result)
    return 0


def _write_json(path: Path, value) -> None:
    _write_text(path, json.dumps(value, indent=2, default=float) + "\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _evaluate(options) -> int:
    import kmtl
    from kmtl import data, export

    model = export.load_keras(options["model"])
    tasks = list(model.task_names)
    run_config = options["run_config"]
    if options["tasks"] is not None:
        if sorted(options["tasks"]) != sorted(tasks):
            raise UsageError(
                f"{run_config} lists tasks {options['tasks']}, but {options['model']} has heads {tasks}: "
                f"it is not this model's run configuration. Move the model out of that directory or "
                f"pass --dataset to evaluate the model's own heads"
            )
        tasks = list(options["tasks"])
    dataset = options["dataset"]
    expected = tuple(data.input_shape(dataset))
    if len(model.inputs) == 1 and tuple(model.inputs[0].shape[1:]) != expected:
        raise UsageError(
            f"{options['model']} takes inputs of shape {tuple(model.inputs[0].shape[1:])}, but dataset "
            f"{dataset!r} has images of shape {expected}; pass the --dataset it was trained on"
        )
    source = f" (dataset, tasks and data settings from {run_config})" if run_config else ""
    print(f"kmtl: evaluating {options['model']} on {dataset} {options['split']}, tasks {tasks}{source}")
    test = data.task_dataset(
        dataset,
        tasks,
        split=options["split"],
        batch_size=options["batch_size"],
        source=options["source"],
        data_dir=options["data_dir"],
    )
    print(kmtl.evaluate(model, test))
    return 0


def _export(options) -> int:
    from kmtl import export

    model = export.load_keras(options["model"])
    path = export.saved_model(model, options["out"])
    print(f"kmtl: wrote SavedModel {path} (outputs: {', '.join(model.output_names)})")
    return 0


def _fail(status: int, message: str):
    sys.stderr.write(f"kmtl: {message}\n")
    raise SystemExit(status)


def run(command: str, options: dict) -> int:
    """Runs a command parsed and checked by `kmtl_cli.parse`.

    Errors that name a bad input (`ValueError`, missing or misplaced files)
    exit with status 2 and `kmtl: error: ...`; a non-finite loss stops
    training with status 1.
    """
    try:
        if command == "train":
            return _train(options)
        if command == "evaluate":
            return _evaluate(options)
        if command == "export":
            return _export(options)
        raise UsageError(f"unknown command {command!r}")
    except (
        UsageError,
        ValueError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        FileExistsError,
    ) as error:
        _fail(2, f"error: {error}")
    except FloatingPointError as error:
        _fail(1, f"training stopped: {error}")


def main(argv=None) -> int:
    """In-process entry point: `kmtl.cli.main(["train", "--epochs", "3"])`.

    Parses with the same parser as the `kmtl` console script
    (`kmtl_cli:main`) and returns the exit status (usage errors raise
    `SystemExit(2)`).
    """
    command, options = kmtl_cli.parse(argv)
    return run(command, options)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
