"""Argument parsing of the `kmtl` command, without importing TensorFlow.

The `kmtl` console script points here (`kmtl_cli:main`), not at the `kmtl`
package: importing `kmtl` imports Keras and TensorFlow (it must, so that
every serializable kmtl class is registered before a model is loaded), which
takes seconds. This module uses the standard library only. It parses the
command line, reads and checks `--config` files (JSON, or YAML through
PyYAML, imported only for a `.yaml`/`.yml` file) and the run's
`config.json`, checks every plain value (numbers, ranges, types, choices,
files) and reports usage errors with exit status 2 and `kmtl: error: ...`
at once. Only a valid command imports `kmtl.cli` to run it.

`kmtl.cli.main(argv)` is the in-process entry point (used by the tests); it
calls the same `parse`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

PROG = "kmtl"
DATASETS = (
    "digits",
    "mnist",
    "fashion_mnist",
    "multimnist",
    "multifashion",
    "multi_fashion_mnist",
    "movielens",
    "movielens/temporal",
)
#: Datasets of raw feature rows (whole splits: no --train-limit or sliced splits).
RECOMMENDER_DATASETS = ("movielens", "movielens/temporal")
SOURCES = ("auto", "local", "tfds")
BENCHMARK_DATASETS = ("multimnist", "multifashion", "multi_fashion_mnist", "movielens")
VERBOSITY = (0, 1, 2)

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
#: Keys a --config file (and `kmtl.experiment.load_config`) may use besides the options
#: above: `seeds` (distinct seeds: several make the run a `kmtl.experiment`), `validation`
#: (the split `fit` validates on; default: the test split), `name` (= `run_name`),
#: `train_split` (the split trained on, e.g. `"train[:90%]"`; default: `train`, or its
#: first `train_limit` examples), `test_split` (the split of the final report; default:
#: `test`) and `tensorboard` (write TensorBoard logs to `<run>/logs/`; also `--tensorboard`).
CONFIG_ONLY_DEFAULTS = {
    "seeds": None,
    "validation": None,
    "name": None,
    "train_split": None,
    "test_split": None,
    "tensorboard": False,
    "architecture_options": None,
}
CONFIG_KEYS = tuple(TRAIN_DEFAULTS) + tuple(CONFIG_ONLY_DEFAULTS)
DEFAULT_TASKS = {
    "digits": "digit,parity",
    "mnist": "digit,parity",
    "fashion_mnist": "item,group",
    "multimnist": "left,right",
    "multifashion": "left,right",
    "multi_fashion_mnist": "left,right",
    "movielens": "rating,liked,watched",
    "movielens/temporal": "rating,liked,watched",
}
#: Option defaults of `kmtl evaluate` when the run has no `config.json`.
EVALUATE_DEFAULTS = {
    "dataset": "digits",
    "split": "test",
    "batch_size": 512,
    "source": "auto",
    "data_dir": None,
}
#: The keys of a run's `config.json` that `kmtl evaluate` uses.
RUN_CONFIG_KEYS = ("dataset", "tasks", "source", "data_dir")
MAX_SEED = 2**32 - 1
#: A --config file larger than this is refused (configs are a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20
#: A YAML config whose aliases expand to more nodes than this is refused ("billion laughs").
MAX_YAML_NODES = 10_000


class UsageError(Exception):
    """A bad option value: reported as `kmtl: error: ...` with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Reports every usage error as `kmtl: error: ...` (also in subcommands)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `kmtl` (no option abbreviations: `--epoch` is not `--epochs`)."""
    parser = _Parser(prog=PROG, description="Multi-task learning for Keras 3.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,export,benchmark}")

    train = sub.add_parser(
        "train",
        help="train a multi-task model and save it",
        description="Train a multi-task model and write saved_models/<run>/.",
        allow_abbrev=False,
    )
    train.add_argument(
        "--config",
        help="JSON or YAML (.yaml/.yml) file with any of the options below as keys, and seeds, "
        "validation, name (flags override it)",
    )
    train.add_argument("--dataset", choices=DATASETS, help="default: digits (embedded, offline)")
    train.add_argument("--tasks", help="comma-separated task names (default depends on the dataset)")
    train.add_argument("--epochs", help="positive integer (default: 10)")
    train.add_argument("--batch-size", dest="batch_size", help="positive integer (default: 64)")
    train.add_argument(
        "--loss-weights",
        dest="loss_weights",
        help="task=weight pairs, weights finite and >= 0: digit=1,parity=0.5",
    )
    train.add_argument(
        "--weighting", help="a kmtl.weighting strategy name, e.g. pcgrad (options: in a --config file)"
    )
    train.add_argument("--architecture", help="e.g. hard_sharing, mmoe (default: hard_sharing)")
    train.add_argument(
        "--trunk",
        help=(
            "lenet, conv, dense or dense:<sizes> such as dense:64,32 (default: conv; lenet for multimnist, "
            "multifashion, multi_fashion_mnist; dense:64,32 for movielens)"
        ),
    )
    train.add_argument("--optimizer", help="a Keras optimizer name (default: adam)")
    train.add_argument("--learning-rate", dest="learning_rate", help="finite number > 0 (default: 0.001)")
    train.add_argument("--out", help="parent directory of the run (default: saved_models)")
    train.add_argument("--run-name", dest="run_name", help="default: <dataset>-<date>-<time>")
    train.add_argument("--source", choices=SOURCES, help="where the data comes from (default: auto)")
    train.add_argument("--data-dir", dest="data_dir", help="default: $KMTL_DATA_DIR")
    seeds = train.add_mutually_exclusive_group()
    seeds.add_argument("--seed", help=f"integer in [0, {MAX_SEED}] (default: 0)")
    seeds.add_argument(
        "--seeds",
        help="distinct comma-separated seeds, e.g. 0,1,2: train once per seed into <run>/seed-<s>/ and "
        "write <run>/experiment.json with the mean and std (kmtl.experiment; cached by config hash)",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="with several seeds: retrain even if <run>/experiment.json holds this config's results, "
        "or overwrite an experiment of another config",
    )
    train.add_argument(
        "--no-resume",
        dest="no_resume",
        action="store_true",
        help="start over: delete the checkpoint an interrupted run left in its run directory "
        "(default: continue from it)",
    )
    train.add_argument(
        "--train-limit", dest="train_limit", help="use only the first N training examples (N >= 1)"
    )
    train.add_argument("--verbose", type=int, choices=VERBOSITY, help="Keras fit verbosity (default: auto)")
    train.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="write TensorBoard logs (per-task losses and metrics, task weights, gradient cosines) "
        "to <run>/logs/",
    )

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a saved .keras model per task",
        description=(
            "Evaluate a .keras model per task. When the model sits in a run directory written by "
            "`kmtl train`, the run's config.json supplies the dataset, tasks, source and data "
            "directory; flags override it."
        ),
        allow_abbrev=False,
    )
    evaluate.add_argument("model", help="path of a .keras file")
    evaluate.add_argument("--dataset", choices=DATASETS, help="default: the run's dataset, else digits")
    evaluate.add_argument("--split", help="e.g. test, train[:1000] (default: test)")
    evaluate.add_argument("--batch-size", dest="batch_size", help="positive integer (default: 512)")
    evaluate.add_argument("--source", choices=SOURCES, help="default: the run's source, else auto")
    evaluate.add_argument("--data-dir", dest="data_dir", help="default: the run's, else $KMTL_DATA_DIR")

    export = sub.add_parser(
        "export",
        help="export a .keras model as a SavedModel",
        description="Export a .keras model as a TF SavedModel (an atomic switch of OUT, see README).",
        allow_abbrev=False,
    )
    export.add_argument("model", help="path of a .keras file")
    export.add_argument("out", help="path of the SavedModel")
    export.add_argument(
        "--signature-per-task",
        dest="signature_per_task",
        action="store_true",
        help="also write a serve_<task> signature per head (a task-routed model's takes only that task's inputs)",
    )

    bench = sub.add_parser(
        "benchmark",
        help="single-task, tuned static weights and the strategies on a MultiMNIST-style table",
        description=(
            "Train single-task baselines, a static-weight sweep (chosen on a validation split) and "
            "the strategies on a two-object dataset with MultiLeNet, several seeds, and write "
            "<out>/benchmark-<dataset>-<budget>/ (table.md, results.json, tradeoff.png); for movielens, "
            "single-task baselines and every architecture x strategy on MovieLens 100K (table.md, "
            "results.json). Every run is cached: a repeated or interrupted benchmark trains only what "
            "is missing."
        ),
        allow_abbrev=False,
    )
    bench.add_argument("dataset", choices=BENCHMARK_DATASETS)
    bench.add_argument(
        "--quick",
        action="store_true",
        help="1 epoch x 1 seed, within 15 minutes on 2 CPU cores",
    )
    bench.add_argument("--epochs", help="override the budget's epochs (full: 10; movielens: 4)")
    bench.add_argument("--seeds", help="override the budget's seeds, e.g. 0,1,2 (full: 0,1,2)")
    bench.add_argument("--train-limit", dest="train_limit", help="train on the first N training images")
    bench.add_argument(
        "--strategies", help="comma-separated subset, e.g. equal,mgda_ub,pcgrad (default: all)"
    )
    bench.add_argument(
        "--architectures", help="movielens only: comma-separated subset, e.g. mmoe,esmm (default: all)"
    )
    bench.add_argument("--out", help="parent directory of the runs (default: saved_models)")
    bench.add_argument("--source", choices=SOURCES, help="where the data comes from (default: auto)")
    bench.add_argument("--data-dir", dest="data_dir", help="default: $KMTL_DATA_DIR")
    bench.add_argument("--force", action="store_true", help="retrain every run even if cached")
    bench.add_argument(
        "--no-resume",
        dest="no_resume",
        action="store_true",
        help="start over the seed an interrupted benchmark was training: delete its checkpoint "
        "(default: continue from it; finished runs are reused either way)",
    )
    bench.add_argument(
        "--verbose", type=int, choices=VERBOSITY, help="Keras fit verbosity of each run (default: 0)"
    )
    return parser


# ---------------------------------------------------------------- value checks


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(label, value, from_text, minimum=None, maximum=None, what="an integer"):
    if from_text:
        try:
            value = int(value.strip())
        except ValueError:
            raise UsageError(f"{label} must be {what}. Received: {value!r}") from None
    elif not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{label} must be {what}. Received: {_describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise UsageError(f"{label} must be {what}. Received: {value!r}")
    return value


def _positive_number(label, value, from_text):
    what = "a finite number > 0"
    if from_text:
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"{label} must be {what}. Received: {value!r}") from None
    elif not _is_number(value):
        hint = ""
        if isinstance(value, str) and _parses_as_float(value):
            hint = " (a quoted number? YAML reads 1e-3 as a string: write 1.0e-3)"
        raise UsageError(f"{label} must be {what}{hint}. Received: {_describe(value)}")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{label} must be {what}. Received: {value!r}")
    return float(value)


def _parses_as_float(text) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _string(label, value, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string or null" if optional else "a non-empty string"
        raise UsageError(f"{label} must be {kind}. Received: {_describe(value)}")
    return value


def _choice(label, value, choices):
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        listed = ", ".join(repr(c) for c in choices)
        raise UsageError(f"{label}: invalid choice: {value!r} (choose from {listed})")
    return value


def _tasks(label, value):
    if value is None:
        return None
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()] or None
    if isinstance(value, list) and all(isinstance(t, str) and t.strip() for t in value):
        return [t.strip() for t in value] or None
    raise UsageError(
        f"{label} must be a comma-separated string or a list of task names. Received: {_describe(value)}"
    )


def _weight(label, name, value, text=None):
    if text is not None:
        try:
            value = float(value)
        except ValueError:
            raise UsageError(
                f"{label}: {value!r} is not a number (task {name!r}). Received: {text!r}"
            ) from None
    elif not _is_number(value):
        raise UsageError(
            f"{label}: the weight of task {name!r} must be a number. Received: {_describe(value)}"
        )
    if not math.isfinite(value) or value < 0:
        raise UsageError(
            f"{label}: the weight of task {name!r} must be a finite number >= 0. Received: {value!r}"
        )
    return float(value)


def _loss_weights(label, value):
    """`digit=1,parity=0.5` (flag or config string) or `{"digit": 1}` -> `{task: float}`."""
    if value is None:
        return None
    weights = {}
    if isinstance(value, str):
        for part in value.split(","):
            if "=" not in part:
                raise UsageError(
                    f"{label} takes task=weight pairs like digit=1,parity=0.5. Received: {value!r}"
                )
            name, number = (s.strip() for s in part.split("=", 1))
            if not name:
                raise UsageError(f"{label}: a task name is empty. Received: {value!r}")
            if name in weights:
                raise UsageError(f"{label}: task {name!r} is given twice. Received: {value!r}")
            weights[name] = _weight(label, name, number, text=value)
    elif isinstance(value, dict):
        for name, number in value.items():
            if not isinstance(name, str) or not name.strip():
                raise UsageError(f"{label}: task names must be non-empty strings. Received: {name!r}")
            if name.strip() in weights:
                raise UsageError(f"{label}: task {name.strip()!r} is given twice. Received: {value!r}")
            weights[name.strip()] = _weight(label, name, number)
    else:
        raise UsageError(
            f"{label} must be a string like 'digit=1,parity=0.5' or an object {{task: weight}}. "
            f"Received: {_describe(value)}"
        )
    return weights or None


def _run_name(label, value):
    if value is None:
        return None
    _string(label, value)
    if value in (".", "..") or "/" in value or (os.sep != "/" and os.sep in value):
        raise UsageError(f"{label} must be a plain directory name (no path separators). Received: {value!r}")
    return value


def _verbose(label, value):
    if value == "auto" and isinstance(value, str):
        return value
    return _choice(label, value, VERBOSITY + ("auto",))


def _seeds(label, value, from_text):
    """`0,1,2` (flag) or `[0, 1, 2]` (config) -> a non-empty list of distinct seeds."""
    what = f"a non-empty list of distinct integers in [0, {MAX_SEED}]"
    if from_text:
        parts = [part.strip() for part in value.split(",")]
        if not all(parts):
            raise UsageError(f"{label} must be comma-separated seeds like 0,1,2. Received: {value!r}")
        seeds = [_integer(label, part, True, 0, MAX_SEED, f"an integer in [0, {MAX_SEED}]") for part in parts]
    elif isinstance(value, list) and value:
        seeds = [_integer(label, seed, False, 0, MAX_SEED, what) for seed in value]
    else:
        raise UsageError(f"{label} must be {what}. Received: {_describe(value)}")
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise UsageError(f"{label}: seed(s) {repeated} appear more than once. Received: {value!r}")
    return seeds


def _weighting(label, value):
    """None, a strategy name, or `{"name": strategy, option: value, ...}` (options checked by kmtl)."""
    if not isinstance(value, dict):
        return _string(label, value, optional=True)
    if not isinstance(value.get("name"), str) or not value["name"].strip():
        raise UsageError(
            f'{label} must be a strategy name or an object {{"name": strategy, option: value, ...}} '
            f"with a non-empty string name. Received: {value!r}"
        )
    bad = [key for key in value if not isinstance(key, str) or not key.isidentifier()]
    if bad:
        raise UsageError(f"{label}: option names must be identifiers. Received: {bad!r}")
    return dict(value)


def _check_train_value(key, value, label, from_text):
    """Checks one `kmtl train` option from a flag (text) or a config file (JSON value)."""
    if key == "seeds":
        return _seeds(label, value, from_text)
    if key == "name":
        return _run_name(label, value)
    if key in ("validation", "train_split", "test_split"):
        return _string(label, value, optional=True)
    if key == "tensorboard":
        if not isinstance(value, bool):
            raise UsageError(f"{label} must be true or false. Received: {_describe(value)}")
        return value
    if key == "weighting":
        return _weighting(label, value)
    if key == "architecture_options":
        return _architecture_options(label, value)
    if key in ("epochs", "batch_size"):
        return _integer(label, value, from_text, minimum=1, what="a positive integer")
    if key == "train_limit":
        if value is None:
            return None
        return _integer(label, value, from_text, minimum=1, what="a positive integer (a number of examples)")
    if key == "seed":
        return _integer(
            label, value, from_text, minimum=0, maximum=MAX_SEED, what=f"an integer in [0, {MAX_SEED}]"
        )
    if key == "learning_rate":
        return _positive_number(label, value, from_text)
    if key == "dataset":
        return _choice(label, value, DATASETS)
    if key == "source":
        return _choice(label, value, SOURCES)
    if key == "verbose":
        return _verbose(label, value)
    if key == "tasks":
        return _tasks(label, value)
    if key == "loss_weights":
        return _loss_weights(label, value)
    if key == "run_name":
        return _run_name(label, value)
    if key in ("trunk", "data_dir"):
        return _string(label, value, optional=True)
    return _string(label, value)  # architecture, optimizer, out


def _architecture_options(label, value):
    """None, or a mapping of option names to JSON values (checked against the architecture later)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise UsageError(
            f'{label} must be a mapping of option names to values, e.g. {{"shared_depth": 1}}. '
            f"Received: {_describe(value)}"
        )
    return dict(value)


def check_train_value(key: str, value, label: str | None = None, from_text: bool = False):
    """Checks one value of a `kmtl train` option or config key; returns it normalised.

    The same checks as the flags and `--config` files get (types count:
    `"3"` is not an integer unless `from_text`).

    Args:
        key: a key of `CONFIG_KEYS`.
        value: the value (text when `from_text`).
        label: how the message names the value; default `'"<key>"'`.
        from_text: whether `value` is command-line text to convert.

    Raises:
        UsageError: naming `label`, what was expected and what was received.
    """
    if key not in CONFIG_KEYS:
        raise UsageError(
            f"Unknown option {key!r}; the allowed keys are {list(CONFIG_KEYS)}. Received: {key!r}"
        )
    return _check_train_value(key, value, label or f'"{key}"', from_text)


# ---------------------------------------------------------------- files


def _reject_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise UsageError(f"key(s) {duplicates} appear more than once")
    return dict(pairs)


def _read_mapping(path, what, kind: str, container: str, parse, syntax_errors) -> dict:
    """Reads `path` and parses it with `parse`; every problem is a `UsageError` naming the file."""
    if not os.path.exists(path):
        raise UsageError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory, not a {kind} file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)  # a bounded read: the path may be /dev/zero
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"Cannot read {what} {path}: {error}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise UsageError(
            f"{what} {path} is larger than {MAX_CONFIG_BYTES} characters; it is not a config file. "
            f"Received: more than {MAX_CONFIG_BYTES} characters"
        )
    try:
        value = parse(text)
    except syntax_errors as error:
        raise UsageError(f"{what} {path} is not valid {kind}: {error}") from None
    except RecursionError:
        raise UsageError(
            f"{what} {path} nests its values too deeply to be a config. Received: {len(text)} characters"
        ) from None
    except UsageError as error:
        raise UsageError(f"{what} {path}: {error}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} {path} must hold a {kind} {container}. Received: {type(value).__name__}")
    return value


def read_json_object(path, what) -> dict:
    """Reads a JSON object from `path`; every problem is a `UsageError` naming the file."""

    def parse(text):
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)

    return _read_mapping(path, what, "JSON", "object", parse, json.JSONDecodeError)


def _yaml_mapping_without_duplicates(loader, node, deep=False):
    # The mapping's own keys (not those merged in with `<<`, which it may override).
    keys = [
        loader.construct_object(key, deep=True)
        for key, _ in node.value
        if key.tag != "tag:yaml.org,2002:merge"
    ]
    duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
    if duplicates:
        raise UsageError(f"key(s) {duplicates} appear more than once")
    return loader.construct_mapping(node, deep=deep)


def _yaml_expanded_size(node, sizes: dict) -> int:
    """The number of nodes of a YAML document once its aliases are expanded (each node counted once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts once: PyYAML builds it as a cycle
        children = node.value if isinstance(node.value, list) else []
        pairs = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        sizes[id(node)] = min(1 + sum(_yaml_expanded_size(child, sizes) for child in pairs), 2**62)
    return sizes[id(node)]


def _read_yaml_object(path, what) -> dict:
    try:
        import yaml
    except ImportError:
        raise UsageError(f"Reading the YAML file {what} {path} needs PyYAML: pip install pyyaml") from None

    class Loader(yaml.SafeLoader):  # yaml.safe_load, refusing a key given twice (as JSON files do)
        pass

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _yaml_mapping_without_duplicates)

    def parse(text):
        loader = Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            expanded = _yaml_expanded_size(node, {})
            if expanded > MAX_YAML_NODES:
                raise UsageError(
                    f"its aliases expand to {expanded} values, more than the {MAX_YAML_NODES} a config "
                    f"may hold (an alias bomb?). Received: {len(text)} characters"
                )
            return loader.construct_document(node)
        finally:
            loader.dispose()

    return _read_mapping(path, what, "YAML", "mapping", parse, yaml.YAMLError)


def read_config_file(path, what="--config") -> dict:
    """Reads a config file: YAML for a `.yaml`/`.yml` name, else JSON.

    YAML is read as `yaml.safe_load` does (plain values only), except that
    a key given twice is refused, as in JSON files, and so is a document
    whose aliases expand to more than `MAX_YAML_NODES` values.

    Raises:
        UsageError: naming the file, for a missing, unreadable or malformed
            file, one larger than `MAX_CONFIG_BYTES` characters or nested
            too deeply to parse, or one that does not hold a mapping.
    """
    if str(path).lower().endswith((".yaml", ".yml")):
        return _read_yaml_object(path, what)
    return read_json_object(path, what)


def check_config(config: dict, source: str) -> dict:
    """Checks the keys and values of a config mapping (a --config file's content).

    Every value gets the check of its flag. `name` is another spelling of
    `run_name` (the result holds `run_name`); `seed` and `seeds` together
    must agree (`seeds == [seed]`).

    Args:
        config: the mapping.
        source: how messages name it, e.g. the file's path.

    Returns:
        The checked values, keyed as in `CONFIG_KEYS` (without `name`).

    Raises:
        UsageError: for an unknown key (listing the allowed keys) or a bad value.
    """
    unknown = sorted((key for key in config if key not in CONFIG_KEYS), key=str)
    if unknown:
        raise UsageError(
            f"Unknown option(s) {unknown} in {source}. Known: {sorted(CONFIG_KEYS)}. Received: keys "
            f"{sorted(config, key=str)}"
        )
    checked = {
        key: _check_train_value(key, value, f'"{key}" in {source}', from_text=False)
        for key, value in config.items()
    }
    if "name" in checked:
        name = checked.pop("name")
        if name is not None:
            if checked.get("run_name") not in (None, name):
                raise UsageError(
                    f'"name" and "run_name" in {source} are the same option and differ. '
                    f"Received: name={name!r}, run_name={checked['run_name']!r}"
                )
            checked["run_name"] = name
    if checked.get("seeds") is not None and "seed" in checked and checked["seeds"] != [checked["seed"]]:
        raise UsageError(
            f'Give either "seed" or "seeds" in {source}, not both. '
            f"Received: seed={checked['seed']!r}, seeds={checked['seeds']!r}"
        )
    return checked


def check_train_options(options: dict, flags: bool = True) -> dict:
    """The checks across options, after they are merged; fills the default tasks.

    Args:
        options: merged options (all keys of `TRAIN_DEFAULTS`); changed in place.
        flags: whether messages name the flags (`--loss-weights`) or the
            config keys (`"loss_weights"`).

    Returns:
        `options`.

    Raises:
        UsageError: for loss weights of tasks that are not trained or all 0, or
            an output path that is not a directory.
    """
    weights_label = "--loss-weights" if flags else '"loss_weights"'
    out_label = "--out" if flags else '"out"'
    if not options["tasks"]:
        options["tasks"] = DEFAULT_TASKS[options["dataset"]].split(",")
    weights = options["loss_weights"]
    if weights is not None:
        unknown = [name for name in weights if name not in options["tasks"]]
        if unknown:
            raise UsageError(
                f"{weights_label} names task(s) {unknown} that are not trained; the tasks are "
                f"{options['tasks']}. Received: loss_weights={weights!r}"
            )
        if len(weights) == len(options["tasks"]) and not any(weights.values()):
            raise UsageError(f"{weights_label} are all 0: nothing would be trained. Received: {weights!r}")
    if options["dataset"] in RECOMMENDER_DATASETS:
        sliced = [
            key
            for key in ("train_limit", "train_split", "validation", "test_split")
            if options.get(key) is not None and (key == "train_limit" or "[" in str(options[key]))
        ]
        if sliced:
            raise UsageError(
                f"{options['dataset']} trains and tests on whole splits (a slice would cut the sampled "
                f"negatives from their ratings); drop {sliced}. Received: "
                + ", ".join(f"{key}={options[key]!r}" for key in sliced)
            )
    if options.get("train_split") is not None:
        if options["train_limit"] is not None:
            raise UsageError(
                f"Give either train_limit or train_split, not both. Received: train_limit="
                f"{options['train_limit']!r}, train_split={options['train_split']!r}"
            )
        if not options["train_split"].startswith("train"):
            raise UsageError(
                f'train_split must be a slice of the training split, e.g. "train[:90%]". '
                f"Received: {options['train_split']!r}"
            )
    if os.path.exists(options["out"]) and not os.path.isdir(options["out"]):
        raise UsageError(f"{out_label} {options['out']} exists and is not a directory")
    return options


def train_options(args) -> dict:
    """The checked options of `kmtl train`: defaults < --config file < flags.

    Besides `TRAIN_DEFAULTS`'s keys the result has `seeds` (None or a list),
    `validation`, `train_split`, `test_split` (None or a split),
    `tensorboard`, `force`, `resume` (False with `--no-resume`) and `experiment`: True when the
    run is a `kmtl.experiment` (`--seeds`, or a config with several seeds).
    """
    options = dict(TRAIN_DEFAULTS, **{k: v for k, v in CONFIG_ONLY_DEFAULTS.items() if k != "name"})
    if args.config is not None:
        options.update(check_config(read_config_file(args.config, "--config"), args.config))
    for key in TRAIN_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            flag = "--" + key.replace("_", "-")
            options[key] = _check_train_value(key, value, flag, from_text=isinstance(value, str))
    if args.seed is not None:
        options["seeds"] = None  # the flag overrides the config's seeds
    if args.seeds is not None:
        options["seeds"] = _check_train_value("seeds", args.seeds, "--seeds", from_text=True)
    seeds = options["seeds"]
    options["experiment"] = args.seeds is not None or (seeds is not None and len(seeds) > 1)
    if seeds is not None and not options["experiment"]:
        options["seed"] = seeds[0]
    options["force"] = bool(args.force)
    options["resume"] = not args.no_resume
    if args.tensorboard:
        options["tensorboard"] = True
    return check_train_options(options)


def run_config_path(model_path) -> str:
    """The `config.json` of the run that holds `model_path` (it may not exist)."""
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")


def _check_model_path(label, path):
    if not os.path.lexists(path):
        raise UsageError(f"No such model file: {path}")
    if os.path.isdir(path):
        hint = ""
        if os.path.isfile(os.path.join(path, "model.keras")):
            hint = f"; did you mean {os.path.join(path, 'model.keras')}?"
        elif os.path.isfile(os.path.join(path, "saved_model.pb")):
            hint = " (it holds a SavedModel; `kmtl` commands take the run's .keras file)"
        raise UsageError(f"{label} {path} is a directory, not a .keras file{hint}")
    if not os.path.exists(path):
        raise UsageError(f"No such model file: {path} (a broken symbolic link)")
    return path


def evaluate_options(args) -> dict:
    """The checked options of `kmtl evaluate`: defaults < the run's config.json < flags.

    `options["tasks"]` is the run's task list (None without a run config, or
    when --dataset names another dataset than the run's: then the model's
    heads are the tasks).
    """
    options = dict(
        EVALUATE_DEFAULTS, model=_check_model_path("MODEL", args.model), tasks=None, run_config=None
    )
    flags = {key: getattr(args, key) for key in ("dataset", "source", "data_dir", "split")}
    config_path = run_config_path(args.model)
    if os.path.isfile(config_path):
        config = read_json_object(config_path, "The run's config")
        for key in RUN_CONFIG_KEYS:
            if key not in config or flags.get(key) is not None:
                continue  # a flag overrides the run's value (which is then not checked either)
            if key == "tasks" and flags["dataset"] not in (None, config.get("dataset")):
                continue  # the run's tasks belong to the run's dataset
            options[key] = _check_train_value(key, config[key], f'"{key}" in {config_path}', from_text=False)
        options["run_config"] = config_path
    for key, value in flags.items():
        if value is not None:
            options[key] = _string("--" + key.replace("_", "-"), value)
    if args.batch_size is not None:
        options["batch_size"] = _integer(
            "--batch-size", args.batch_size, True, minimum=1, what="a positive integer"
        )
    return options


def export_options(args) -> dict:
    return {
        "model": _check_model_path("MODEL", args.model),
        "out": _string("OUT", args.out),
        "signature_per_task": bool(args.signature_per_task),
    }


def benchmark_options(args) -> dict:
    """The checked options of `kmtl benchmark` (the strategy names are checked by kmtl)."""
    options = {
        "dataset": args.dataset,
        "quick": bool(args.quick),
        "force": bool(args.force),
        "resume": not args.no_resume,
        "source": args.source or "auto",
        "data_dir": args.data_dir,
        "verbose": 0 if args.verbose is None else args.verbose,
        "out": args.out or "saved_models",
        "epochs": None,
        "seeds": None,
        "train_limit": None,
        "strategies": None,
    }
    if args.dataset in RECOMMENDER_DATASETS:
        if args.train_limit is not None:
            raise UsageError(
                f"--train-limit does not apply to {args.dataset} (whole splits). Received: --train-limit "
                f"{args.train_limit}"
            )
        del options["train_limit"], options["dataset"]
        options["architectures"] = None
        if args.architectures is not None:
            options["architectures"] = _names("--architectures", args.architectures)
    elif args.architectures is not None:
        raise UsageError(
            f"--architectures applies to the movielens benchmark only (the image benchmarks use hard "
            f"sharing). Received: --architectures {args.architectures} for {args.dataset}"
        )
    if args.epochs is not None:
        options["epochs"] = _integer("--epochs", args.epochs, True, minimum=1, what="a positive integer")
    if args.train_limit is not None:
        options["train_limit"] = _integer(
            "--train-limit", args.train_limit, True, minimum=2, what="an integer >= 2 (a number of images)"
        )
    if args.seeds is not None:
        options["seeds"] = _seeds("--seeds", args.seeds, True)
    if args.strategies is not None:
        options["strategies"] = _names("--strategies", args.strategies)
    if os.path.exists(options["out"]) and not os.path.isdir(options["out"]):
        raise UsageError(f"--out {options['out']} exists and is not a directory")
    return options


def _names(flag: str, text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise UsageError(f"{flag} must be comma-separated names. Received: {text!r}")
    return names


def parse(argv=None) -> tuple[str, dict]:
    """Parses and checks `argv`; exits with status 2 and `kmtl: error: ...` if it is bad.

    Returns:
        `(command, options)`, ready for `kmtl.cli.run`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return "train", train_options(args)
        if args.command == "evaluate":
            return "evaluate", evaluate_options(args)
        if args.command == "benchmark":
            return "benchmark", benchmark_options(args)
        return "export", export_options(args)
    except UsageError as error:
        parser.exit(2, f"{PROG}: error: {error}\n")


def main(argv=None) -> int:
    """Entry point of the `kmtl` console script: parse here, then run in `kmtl.cli`."""
    command, options = parse(argv)
    from kmtl import cli  # imports TensorFlow: only for a valid command

    return cli.run(command, options)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
