"""The `kmtl` command: train, evaluate and export multi-task models.

    kmtl train                      # embedded digits data, offline, seconds
    kmtl train --dataset mnist --tasks digit,parity --epochs 3 --weighting pcgrad
    kmtl train --config run.json    # the same options from a JSON (or .yaml) file
    kmtl train --config exp.yaml --seeds 0,1,2     # an experiment: one run per seed, mean ± std
    kmtl evaluate saved_models/<run>/model.keras     # the run's dataset and tasks
    kmtl export saved_models/<run>/model.keras saved_models/<run>/served
    kmtl benchmark multimnist --quick   # single-task, tuned static weights, 9 strategies: table + plot
    kmtl benchmark movielens --quick    # single-task, 5 architectures x 3 strategies on MovieLens 100K

A run writes `saved_models/<run-name>/`: `saved_model` (TF SavedModel),
`model.keras`, `history.json`, `metrics.json`, `metrics.md`, `curves.png`
and `config.json`. With several seeds (`--seeds`, or `seeds` in the config)
`kmtl train` runs `kmtl.experiment.run`: one such run per seed in
`<run>/seed-<s>/` and `<run>/experiment.json` with the per-seed metrics and
their mean and std; an experiment whose config hash and seeds are already
there is not trained again (`--force` retrains it). A run killed while it
trains continues from its checkpoint when the same command runs again
(`<run>/checkpoint/`, see `kmtl.experiment.train_run`; `--no-resume` starts
over). Bad options exit with status 2 and `kmtl: error: ...`.

Parsing and the checks of plain values live in the top-level module
`kmtl_cli` (standard library only, so that `kmtl --help` and usage errors
never import TensorFlow); this module runs a parsed command. `main(argv)` is
the in-process entry point and uses the same parser.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import kmtl_cli
from kmtl_cli import DEFAULT_TASKS, TRAIN_DEFAULTS, UsageError

__all__ = ["DEFAULT_TASKS", "TRAIN_DEFAULTS", "UsageError", "main", "run"]


def _train(options) -> int:
    if options.get("experiment"):
        return _train_experiment(options)
    run_name = options["run_name"] or f"{options['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    from kmtl import experiment

    experiment.train_run(options, Path(options["out"]) / run_name, resume=options.get("resume", True))
    return 0


def _train_experiment(options) -> int:
    from kmtl import experiment

    config = {key: options[key] for key in kmtl_cli.CONFIG_KEYS if key in options and key != "seed"}
    result = experiment.run(config, force=options["force"], resume=options.get("resume", True))
    print(result)
    return 0


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
    if (dataset in data.RECOMMENDER_DATASETS) != (model.features is not None):
        raise UsageError(
            f"{options['model']} takes "
            + ("raw feature columns" if model.features is not None else "images")
            + f", but dataset {dataset!r} has "
            + ("feature rows" if dataset in data.RECOMMENDER_DATASETS else "images")
            + "; pass the --dataset it was trained on"
        )
    if model.features is None:
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
    path = export.saved_model(
        model, options["out"], signature_per_task=options.get("signature_per_task", False)
    )
    signatures = ["serving_default"]
    if options.get("signature_per_task"):
        signatures += [f"serve_{task}" for task in model.output_names]
    print(
        f"kmtl: wrote SavedModel {path} (outputs: {', '.join(model.output_names)}; "
        f"signatures: {', '.join(signatures)})"
    )
    return 0


def _benchmark(options) -> int:
    from kmtl import benchmark, benchmark_movielens

    if "dataset" in options:
        benchmark.run(**options)
    else:  # movielens (its options have no dataset and no train_limit)
        benchmark_movielens.run(**options)
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
        if command == "benchmark":
            return _benchmark(options)
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
