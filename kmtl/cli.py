"""The `kmtl` command: train, evaluate and export multi-task models.

    kmtl train                      # embedded digits data, offline, seconds
    kmtl train --dataset mnist --tasks digit,parity --epochs 3 --weighting pcgrad
    kmtl train --config run.json    # the same options from a JSON file
    kmtl evaluate saved_models/<run>/model.keras --dataset mnist
    kmtl export saved_models/<run>/model.keras saved_models/<run>/served

A run writes `saved_models/<run-name>/`: `saved_model/` (TF SavedModel),
`model.keras`, `history.json`, `metrics.json`, `metrics.md`, `curves.png`
and `config.json`. Bad options exit with status 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

#: Option defaults of `kmtl train` (also the keys a --config file may use).
TRAIN_DEFAULTS = {
    "dataset": "digits",
    "tasks": None,
    "epochs": 10,
    "batch_size": 64,
    "loss_weights": None,
    "weighting": None,
    "architecture": "hard_sharing",
    "trunk": None,
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "out": "saved_models",
    "run_name": None,
    "source": "auto",
    "data_dir": None,
    "seed": 0,
    "train_limit": None,
    "verbose": "auto",
}
DEFAULT_TASKS = {"digits": "digit,parity", "mnist": "digit,parity", "fashion_mnist": "item,group"}


class UsageError(Exception):
    """A bad option value: reported with exit status 2."""


def _parse_loss_weights(text):
    if text is None or isinstance(text, dict):
        return text
    weights = {}
    for part in str(text).split(","):
        if "=" not in part:
            raise UsageError(
                f"--loss-weights takes task=weight pairs like digit=1,parity=0.5. Received: {text!r}"
            )
        name, value = part.split("=", 1)
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise UsageError(
                f"--loss-weights: {value!r} is not a number (task {name!r}). Received: {text!r}"
            ) from None
    return weights


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmtl", description="Multi-task learning for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a multi-task model and save it")
    train.add_argument("--config", help="JSON file with any of the options below (flags override it)")
    train.add_argument(
        "--dataset", choices=["digits", "mnist", "fashion_mnist"], help="default: digits (embedded, offline)"
    )
    train.add_argument("--tasks", help="comma-separated task names (default depends on the dataset)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--loss-weights", dest="loss_weights", help="e.g. digit=1,parity=0.5")
    train.add_argument("--weighting", help="a kmtl.weighting strategy name, e.g. pcgrad")
    train.add_argument("--architecture", help="e.g. hard_sharing, mmoe")
    train.add_argument("--trunk", help="lenet, conv or dense (default: conv)")
    train.add_argument("--optimizer")
    train.add_argument("--learning-rate", dest="learning_rate", type=float)
    train.add_argument("--out", help="parent directory of the run (default: saved_models)")
    train.add_argument("--run-name", dest="run_name", help="default: <dataset>-<date>-<time>")
    train.add_argument("--source", choices=["auto", "local", "tfds"])
    train.add_argument("--data-dir", dest="data_dir", help="default: $KMTL_DATA_DIR")
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--train-limit", dest="train_limit", type=int, help="use only the first N training examples"
    )
    train.add_argument("--verbose", type=int, choices=[0, 1, 2])

    evaluate = sub.add_parser("evaluate", help="evaluate a saved .keras model per task")
    evaluate.add_argument("model", help="path of a .keras file")
    evaluate.add_argument("--dataset", choices=["digits", "mnist", "fashion_mnist"], default="digits")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--batch-size", dest="batch_size", type=int, default=512)
    evaluate.add_argument("--source", choices=["auto", "local", "tfds"], default="auto")
    evaluate.add_argument("--data-dir", dest="data_dir")

    export = sub.add_parser("export", help="export a .keras model as a SavedModel")
    export.add_argument("model", help="path of a .keras file")
    export.add_argument("out", help="directory of the SavedModel")
    return parser


def _train_options(args) -> dict:
    options = dict(TRAIN_DEFAULTS)
    if args.config:
        try:
            with open(args.config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise UsageError(f"Cannot read --config {args.config}: {error}") from None
        if not isinstance(config, dict):
            raise UsageError(f"--config must hold a JSON object. Received: {type(config).__name__}")
        unknown = sorted(set(config) - set(TRAIN_DEFAULTS))
        if unknown:
            raise UsageError(f"Unknown option(s) {unknown} in {args.config}. Known: {sorted(TRAIN_DEFAULTS)}")
        options.update(config)
    for key in TRAIN_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    if isinstance(options["tasks"], str):
        options["tasks"] = [t.strip() for t in options["tasks"].split(",") if t.strip()]
    if not options["tasks"]:
        options["tasks"] = DEFAULT_TASKS.get(options["dataset"], "").split(",")
    options["loss_weights"] = _parse_loss_weights(options["loss_weights"])
    for key in ("epochs", "batch_size"):
        if not isinstance(options[key], int) or options[key] < 1:
            raise UsageError(
                f"--{key.replace('_', '-')} must be a positive integer. Received: {options[key]!r}"
            )
    return options


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
    model.compile(optimizer=optimizer, loss_weights=options["loss_weights"], weighting=options["weighting"])
    return model


def _train(options) -> int:
    import keras

    import kmtl
    from kmtl import data, export, plots

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
    model = _build(options, data)
    run_name = options["run_name"] or f"{options['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(options["out"]) / run_name
    print(
        f"kmtl: training {options['architecture']} on {options['dataset']} tasks "
        f"{options['tasks']} for {options['epochs']} epochs -> {run_dir}"
    )
    verbose = options["verbose"]
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    history = model.fit(train, validation_data=test, epochs=options["epochs"], verbose=verbose)
    report = kmtl.evaluate(model, test)
    print(report)
    run_dir.mkdir(parents=True, exist_ok=True)
    export.save_keras(model, run_dir / "model.keras")
    export.saved_model(model, run_dir / "saved_model")
    _write_json(run_dir / "history.json", history.history)
    _write_json(run_dir / "metrics.json", report.to_dict())
    (run_dir / "metrics.md").write_text(report.to_markdown() + "\n")
    _write_json(run_dir / "config.json", options)
    import matplotlib

    matplotlib.use("Agg")
    fig = plots.plot_history(history)
    fig.savefig(run_dir / "curves.png", dpi=100)
    print(
        f"kmtl: wrote {run_dir}/ (saved_model/, model.keras, history.json, metrics.json, metrics.md, curves.png)"
    )
    return 0


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _evaluate(args) -> int:
    import kmtl
    from kmtl import data, export

    model = export.load_keras(args.model)
    tasks = [t for t in model.task_names]
    test = data.task_dataset(
        args.dataset,
        tasks,
        split=args.split,
        batch_size=args.batch_size,
        source=args.source,
        data_dir=args.data_dir,
    )
    print(kmtl.evaluate(model, test))
    return 0


def _export(args) -> int:
    from kmtl import export

    model = export.load_keras(args.model)
    path = export.saved_model(model, args.out)
    print(f"kmtl: wrote SavedModel {path} (outputs: {', '.join(model.output_names)})")
    return 0


def main(argv=None) -> int:
    """Entry point of the `kmtl` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(_train_options(args))
        if args.command == "evaluate":
            return _evaluate(args)
        return _export(args)
    except UsageError as error:
        parser.exit(2, f"kmtl: error: {error}\n")
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"kmtl: error: {error}\n")
    except FloatingPointError as error:
        parser.exit(1, f"kmtl: training stopped: {error}\n")
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
