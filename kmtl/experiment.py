"""Experiments: one run described by a config, trained for several seeds, cached by its hash.

A config holds the options of `kmtl train` (`kmtl_cli.TRAIN_DEFAULTS`) and
three more keys: `seeds` (distinct seeds, default `[seed]`), `validation` (the
split `fit` validates on, e.g. `"train[50000:]"`; default: the test split, as
`kmtl train` does) and `name` (the run's directory name, also spelled
`run_name`). `weighting` is a strategy name or a mapping
`{"name": strategy, option: value, ...}` whose options go to
`kmtl.weighting.get(name, **options)`.

`run(config)` trains, for each seed, exactly what `kmtl train` trains
(`train_run`) into `<out>/<run>/seed-<s>/`, and writes
`<out>/<run>/experiment.json`: the normalised config, its hash, each seed's
`kmtl.evaluate` report (as a dict), the mean and the population standard
deviation (`ddof=0`: one seed gives 0) of every task's metrics over the seeds,
and each seed's seconds per epoch. `<run>` is `name`, or
`<dataset>-<hash>`. A second `run` of the same config reads that file instead
of training; an interrupted one trains only the seeds that are missing, and
a seed killed mid-training continues from its checkpoint (`train_run`) to the
result an uninterrupted run gives.

Example:

>>> from kmtl import experiment
>>> config = experiment.load_config({"dataset": "digits", "epochs": 1, "seeds": [0, 1]})
>>> experiment.config_hash(config) == experiment.config_hash(dict(config, verbose=0))
True
>>> result = experiment.run(config, out="saved_models")  # doctest: +SKIP
>>> print(result)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import kmtl_cli
from kmtl import _atomic, architectures, data, trunks, weighting

#: Config keys that cannot change what is trained: left out of `config_hash`.
HASH_EXCLUDED = ("out", "verbose", "name", "tensorboard")
#: The delta degrees of freedom of the standard deviation over seeds.
STD_DDOF = 0
#: The keys of a normalised config, in order.
KEYS = tuple(k for k in kmtl_cli.TRAIN_DEFAULTS if k not in ("seed", "run_name")) + tuple(
    kmtl_cli.CONFIG_ONLY_DEFAULTS
)
_FORMAT = 1
#: The directory of a run's resumable checkpoint (`kmtl.callbacks.BackupAndRestore`), deleted when done.
CHECKPOINT_DIR = "checkpoint"
#: How often `train_run` checkpoints mid-epoch by default (besides every epoch boundary).
SAVE_EVERY_SECONDS = 60.0


def _fail(error) -> ValueError:
    return ValueError(str(error))


def load_config(source: str | os.PathLike | Mapping) -> dict:
    """Reads and checks an experiment config; returns it normalised, defaults filled.

    Args:
        source: a `.yaml`/`.yml` file (read as `yaml.safe_load` does), a JSON
            file, or a mapping. Keys: those of `kmtl train`'s options
            (`kmtl_cli.TRAIN_DEFAULTS`), `seeds`, `validation` and `name`.

    Returns:
        A dict with exactly the keys `KEYS`: `seeds` a list, `tasks` a list
        (the dataset's default tasks when not given), `weighting` `None` or
        `{"name": strategy, **options}`, `data_dir` absolute. Passing it to
        `load_config` again returns an equal dict.

    Raises:
        ValueError: for an unreadable file, an unknown key (the message lists
            the allowed keys) or a bad value (the message names the key and the
            allowed values: datasets, the dataset's tasks, architectures,
            strategies and their options, trunks, splits).
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), "the config"
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        try:
            raw = kmtl_cli.read_config_file(where, "Config file")
        except kmtl_cli.UsageError as error:
            raise _fail(error) from None
    else:
        raise ValueError(
            "An experiment config must be a path of a YAML or JSON file or a mapping. "
            f"Received: {source!r} of type {type(source).__name__}"
        )
    options = dict(
        kmtl_cli.TRAIN_DEFAULTS, **{k: v for k, v in kmtl_cli.CONFIG_ONLY_DEFAULTS.items() if k != "name"}
    )
    try:
        options.update(kmtl_cli.check_config(raw, where))
        kmtl_cli.check_train_options(options, flags=False)
    except kmtl_cli.UsageError as error:
        raise _fail(error) from None
    seeds = options["seeds"] if options["seeds"] is not None else [options["seed"]]
    config = {key: options[key] for key in KEYS if key in options}
    config.update(seeds=list(seeds), name=options["run_name"])
    if config["data_dir"] is not None:
        config["data_dir"] = os.path.abspath(os.path.expanduser(config["data_dir"]))
    _check_names(config, where)
    return {key: config[key] for key in KEYS}


def _check_names(config: dict, where: str) -> None:
    """The checks that need kmtl's registries; normalises `weighting` in place."""
    dataset, tasks = config["dataset"], config["tasks"]
    available = data.available_tasks(dataset)
    unknown = [task for task in tasks if task not in available]
    repeated = sorted({task for task in tasks if tasks.count(task) > 1})
    if unknown or repeated:
        problem = f"unknown task(s) {unknown}" if unknown else f"task(s) {repeated} appear more than once"
        raise ValueError(
            f'"tasks" in {where}: {problem}; the tasks of dataset {dataset!r} are {available}. '
            f"Received: tasks={tasks!r}"
        )
    if config["architecture"] not in architectures.names():
        raise ValueError(
            f'"architecture" in {where} must be one of {architectures.names()}. '
            f"Received: architecture={config['architecture']!r}"
        )
    if config["architecture_options"] is not None:
        allowed = architectures.options(config["architecture"])
        unknown = sorted(set(config["architecture_options"]) - set(allowed))
        if unknown:
            raise ValueError(
                f'"architecture_options" in {where}: unknown option(s) {unknown} of architecture '
                f"{config['architecture']!r}; its options are {sorted(allowed)}. "
                f"Received: architecture_options={config['architecture_options']!r}"
            )
    if config["trunk"] is not None:
        try:
            trunks.get(config["trunk"])
        except ValueError as error:
            raise ValueError(f'"trunk" in {where}: {error}') from None
    for key in ("validation", "train_split", "test_split"):
        if config[key] is not None:
            try:
                data.parse_split(config[key])
            except ValueError as error:
                raise ValueError(f'"{key}" in {where}: {error}') from None
    try:
        _optimizer(config)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f'"optimizer" in {where} must be a Keras optimizer name such as "adam", "sgd" or "adamw" '
            f"({error}). Received: optimizer={config['optimizer']!r}"
        ) from None
    if config["weighting"] is not None:
        spec = config["weighting"]
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        build_weighting(spec, f'"weighting" in {where}')
        config["weighting"] = dict(spec, name=_strategy_key(spec["name"]))


def _strategy_key(name: str) -> str:
    """A strategy name as `kmtl.weighting.names()` spells it (`"PC-Grad"` -> `"pc_grad"`)."""
    return name.lower().replace("-", "_")


def _optimizer(config):
    import keras

    return keras.optimizers.get(
        {"class_name": config["optimizer"], "config": {"learning_rate": config["learning_rate"]}}
    )


def build_weighting(spec: str | Mapping, label: str = '"weighting"') -> weighting.Weighting:
    """Returns the strategy a config's `weighting` value names.

    Args:
        spec: a strategy name, or `{"name": strategy, option: value, ...}`.
        label: how messages name the value.

    Returns:
        `kmtl.weighting.get(name, **options)`.

    Raises:
        ValueError: for an unknown strategy (listing `kmtl.weighting.names()`),
            an option the strategy does not take (naming the option, the
            strategy and its options) or a value its constructor refuses.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    options = {key: value for key, value in spec.items() if key != "name"}
    name = spec.get("name")
    if not isinstance(name, str) or _strategy_key(name) not in weighting.names():
        raise ValueError(
            f"{label}: unknown strategy {name!r}; the strategies are {weighting.names()}. "
            f"Received: weighting={dict(spec)!r}"
        )
    key = _strategy_key(name)
    try:
        return weighting.get(key, **options)
    except (TypeError, ValueError) as error:
        accepted = _strategy_options(key)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"{label}: strategy {key!r} has no option(s) {unknown}; its options are {accepted}. "
                f"Received: weighting={dict(spec)!r}"
            ) from None
        raise ValueError(f"{label}: strategy {key!r} refused its options: {error}") from None


def _strategy_options(name: str) -> list[str]:
    """The constructor arguments of a strategy class and its kmtl bases."""
    from kmtl import registry

    accepted = []
    for cls in registry.lookup("weighting", name).__mro__:
        if not (isinstance(cls, type) and issubclass(cls, weighting.Weighting)):
            continue
        for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                if parameter.name not in accepted:
                    accepted.append(parameter.name)
    return accepted


def config_hash(config: str | os.PathLike | Mapping) -> str:
    """A short, stable hash of what a config trains.

    The first 16 hex digits of the SHA-256 of the canonical JSON (sorted keys,
    no spaces) of `load_config(config)` without `HASH_EXCLUDED` (`out`,
    `verbose`, `name`, `tensorboard`). Key order, defaults given or left out, `seed: 3`
    versus `seeds: [3]` and `"pcgrad"` versus `{"name": "pcgrad"}` give the
    same hash; any other value (an epoch, a strategy option, a seed) changes it.

    Args:
        config: what `load_config` accepts.

    Returns:
        16 lowercase hex digits.
    """
    return _hash(load_config(config))


def _hash(normalised: dict) -> str:
    kept = {key: value for key, value in normalised.items() if key not in HASH_EXCLUDED}
    if not kept.get("architecture_options"):
        # Left out when empty, so configs written before the key existed keep their hashes.
        kept.pop("architecture_options", None)
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Result:
    """An experiment's results; `str(result)` is a per-task table of mean ± std.

    Attributes:
        config: the normalised config (`load_config`).
        hash: `config_hash(config)`.
        per_seed: `{seed: {task: {metric: value}}}`, each seed's
            `kmtl.evaluate` report as a dict (with `"overall"`).
        mean: `{task: {metric: mean over seeds}}`.
        std: `{task: {metric: standard deviation over seeds}}`, `ddof=0`.
        run_dir: `<out>/<run>/`, holding `experiment.json` and `seed-<s>/`.
        seconds_per_epoch: `{seed: wall-clock seconds of an epoch}` (mean over
            that seed's epochs, tracing and validation included).
        from_cache: whether `run` read the results instead of training.
    """

    config: dict
    hash: str
    per_seed: dict
    mean: dict
    std: dict
    run_dir: Path
    seconds_per_epoch: dict
    from_cache: bool

    def __str__(self) -> str:
        seeds = list(self.per_seed)
        seconds = self.mean_seconds_per_epoch
        timing = f", {seconds:.2f} s/epoch" if seconds == seconds else ""
        lines = [
            f"experiment {self.run_dir.name} (config {self.hash}): {len(seeds)} seed(s) {seeds}{timing}; "
            f"mean ± std (ddof={STD_DDOF}) over seeds"
        ]
        tasks = [task for task in self.mean if task != "overall"]
        metrics = []
        for task in tasks:
            metrics += [metric for metric in self.mean[task] if metric not in metrics]
        rows = [["task"] + metrics]
        for task in tasks:
            rows.append([task] + [self._cell(task, metric) for metric in metrics])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        table.insert(1, "  ".join("-" * w for w in widths))
        lines += table
        if "overall" in self.mean:
            overall = ", ".join(f"{m}={self._cell('overall', m)}" for m in self.mean["overall"])
            lines.append(f"overall: {overall}")
        return "\n".join(lines)

    @property
    def mean_seconds_per_epoch(self) -> float:
        """The mean of `seconds_per_epoch` over the seeds (NaN when none was timed)."""
        values = [s for s in self.seconds_per_epoch.values() if s == s]
        return float(np.mean(values)) if values else float("nan")

    def _cell(self, task: str, metric: str) -> str:
        if metric not in self.mean[task]:
            return "-"
        return f"{self.mean[task][metric]:.4f} ± {self.std[task][metric]:.4f}"


def summarize(per_seed: Mapping) -> tuple[dict, dict]:
    """Mean and standard deviation (`ddof=0`) over seeds of every task's metrics.

    Args:
        per_seed: `{seed: {task: {metric: value}}}`; only the (task, metric)
            pairs every seed has are summarised.

    Returns:
        `(mean, std)`, each `{task: {metric: float}}`.
    """
    reports = list(per_seed.values())
    mean, std = {}, {}
    for task, metrics in reports[0].items():
        for metric in metrics:
            if not all(metric in report.get(task, {}) for report in reports):
                continue
            values = np.asarray([report[task][metric] for report in reports], dtype=np.float64)
            mean.setdefault(task, {})[metric] = float(np.mean(values))
            std.setdefault(task, {})[metric] = float(np.std(values, ddof=STD_DDOF))
    return mean, std


def _seed_options(config: dict, seed: int, run_dir: Path) -> dict:
    options = {key: config[key] for key in kmtl_cli.TRAIN_DEFAULTS if key in config}
    options.update({key: config[key] for key in kmtl_cli.CONFIG_ONLY_DEFAULTS if key in config})
    options.update(seed=seed, out=str(run_dir), run_name=f"seed-{seed}")
    options.pop("name", None)
    options.pop("seeds", None)
    return options


# --- one seed: what `kmtl train` trains and writes ------------------------------------
def _build(options):
    import kmtl

    dataset = options["dataset"]
    heads = data.task_heads(dataset, options["tasks"])
    trunk = options["trunk"]
    if dataset in data.RECOMMENDER_DATASETS:
        # Raw user and item columns, encoded inside the model; adapted on the training ratings.
        inputs = dict(
            features=data.movielens_features(
                split_scheme=data.RECOMMENDER_DATASETS[dataset],
                source=options["source"],
                data_dir=options["data_dir"],
            )
        )
        trunk = trunks.get(trunk or "dense:64,32")
    else:
        shape = data.input_shape(dataset)
        inputs = dict(input_shape=shape)
        if trunk is None and dataset in data.COMPOSITE_DATASETS:
            trunk = trunks.lenet()  # the MultiLeNet of Sener & Koltun's recipe
        elif trunk is None:
            trunk = trunks.conv((16, 32), (64,)) if shape[0] <= 8 else trunks.conv((32, 64), (128,))
        else:
            trunk = trunks.get(trunk)
    inputs.update(options.get("architecture_options") or {})
    model = kmtl.build_model(heads=heads, trunk=trunk, architecture=options["architecture"], **inputs)
    optimizer = _optimizer(options)
    strategy = options["weighting"]
    spec = {"name": strategy} if isinstance(strategy, str) else strategy
    if isinstance(spec, dict):
        key = _strategy_key(str(spec.get("name", "")))
        if "seed" not in spec and key in weighting.names() and "seed" in _strategy_options(key):
            # A random strategy draws from the run's seed, not from a fresh system seed: the run
            # is reproducible, and a resumed run continues the same draws.
            strategy = dict(spec, seed=options["seed"])
    if isinstance(strategy, dict):  # {"name": strategy, option: value} from a config file
        strategy = build_weighting(strategy)
    model.compile(optimizer=optimizer, loss_weights=options["loss_weights"], weighting=strategy)
    return model


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """What `train_run` trained and wrote.

    Attributes:
        run_dir: the directory it wrote.
        report: the `kmtl.Report` of the model on the test split.
        history: `{key: [one value per epoch]}` as `model.fit`'s
            `history.history`, every epoch included when the run was resumed.
        seconds_per_epoch: wall-clock seconds of an epoch of `fit`, mean over
            the epochs (the first one includes tracing; validation included).
    """

    run_dir: Path
    report: object
    history: dict
    seconds_per_epoch: float


def train_run(
    options: dict,
    run_dir: str | os.PathLike,
    resume: bool = True,
    save_every_steps: int | None = None,
    save_every_seconds: float | None = SAVE_EVERY_SECONDS,
    fingerprint: str | None = None,
) -> TrainedRun:
    """Trains one run, one seed, as `kmtl train` does, and writes `run_dir`.

    Trains on `options["dataset"]`'s training split (its first
    `train_limit` examples, or `train_split`), validates on
    `options.get("validation")` (default: the test split), evaluates on
    `test_split` (default `"test"`), and writes `model.keras`,
    `saved_model/`, `history.json`, `metrics.json`, `metrics.md`,
    `curves.png`, `config.json` (the options, a valid `--config`) and, with
    `tensorboard`, TensorBoard event files under `logs/` (per-task losses
    and metrics, task weights and gradient cosines per epoch).
    `kmtl train` and `kmtl.experiment.run` (once per seed) both call it.

    Training is resumable: `kmtl.callbacks.BackupAndRestore` keeps a
    checkpoint in `run_dir/checkpoint/` (at every epoch boundary, every
    `save_every_steps` batches and every `save_every_seconds` seconds), and
    epoch `e` sees the training examples in the order `(seed, e)` alone
    determines (`kmtl.data.task_dataset(..., epochs=...)`). A run killed at
    any point and started again with the same options (and `resume`)
    continues from the checkpoint — weights, optimizer slots and
    iterations, the strategy's state and random draws, the epoch, the batch
    within it, the metric sums and the history — and ends where an
    uninterrupted run ends, up to float rounding. The checkpoint is deleted
    once the run's files are written. A random strategy (RLW, PCGrad, ...)
    without a `seed` option draws from the run's `seed`.

    Args:
        options: checked options with every key of `kmtl_cli.TRAIN_DEFAULTS`
            (a single `seed`) and optionally `validation`.
        run_dir: the directory to write.
        resume: continue from `run_dir/checkpoint/` if it holds one; `False`
            deletes it and starts over.
        save_every_steps: also checkpoint after every this many batches.
        save_every_seconds: also checkpoint mid-epoch after this many
            seconds since the last save (`None`: never by time).
        fingerprint: identifies what is trained; a checkpoint with another
            one is refused. Default: a hash of the options that change
            what is trained.

    Returns:
        A `TrainedRun`.

    Raises:
        ValueError: with `resume`, for a checkpoint that cannot be read or
            was written by another config (the message names it; nothing
            is changed: pass `resume=False` to start over).
    """
    import keras

    import kmtl
    from kmtl import callbacks as callbacks_module
    from kmtl import data, export, plots

    run_dir = Path(run_dir)
    if fingerprint is None:
        fingerprint = _options_hash(options)
    backup = callbacks_module.BackupAndRestore(
        run_dir / CHECKPOINT_DIR,
        save_every_steps=save_every_steps,
        save_every_seconds=save_every_seconds,
        fingerprint=fingerprint,
    )
    if resume:
        start_epoch, start_step = backup.position()  # refuses a foreign checkpoint before any work
    else:
        backup.clear()
        start_epoch, start_step = 0, 0
    keras.utils.set_random_seed(options["seed"])
    common = dict(source=options["source"], data_dir=options["data_dir"])
    split = "train" if not options["train_limit"] else f"train[:{int(options['train_limit'])}]"
    split = options.get("train_split") or split
    test_split = options.get("test_split") or "test"
    epochs = options["epochs"]

    def make_train(first_epoch, skip_batches):
        return data.task_dataset(
            options["dataset"],
            options["tasks"],
            split=split,
            batch_size=options["batch_size"],
            seed=options["seed"],
            epochs=(first_epoch, epochs),
            skip_batches=skip_batches,
            **common,
        )

    steps_per_epoch = int(make_train(epochs - 1, 0).cardinality())
    test = data.task_dataset(options["dataset"], options["tasks"], split=test_split, batch_size=512, **common)
    validation = test
    if options.get("validation") is not None and options["validation"] != test_split:
        validation = data.task_dataset(
            options["dataset"], options["tasks"], split=options["validation"], batch_size=512, **common
        )
    model = _build(options)
    print(
        f"kmtl: training {options['architecture']} on {options['dataset']} tasks "
        f"{options['tasks']} for {epochs} epochs -> {run_dir}"
    )
    if start_epoch >= epochs:
        print(f"kmtl: resuming from {backup.path}: all {epochs} epochs are trained; evaluating and writing")
    elif (start_epoch, start_step) != (0, 0):
        print(
            f"kmtl: resuming from {backup.path}: epoch {start_epoch + 1}/{epochs}, "
            f"{start_step}/{steps_per_epoch} of its batches already trained",
            flush=True,
        )
    verbose = options["verbose"]
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    timer = _epoch_timer()
    callbacks = [timer]
    if options.get("tensorboard"):
        callbacks += _tensorboard_callbacks(model, validation, run_dir / "logs")
    history = callbacks_module.fit_resumable(
        model,
        make_train,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        backup=backup,
        callbacks=callbacks,
        validation_data=validation,
        verbose=verbose,
    )
    report = kmtl.evaluate(model, test)
    print(report)
    run_dir.mkdir(parents=True, exist_ok=True)
    export.save_keras(model, run_dir / "model.keras")
    export.saved_model(model, run_dir / "saved_model")
    write_json_atomic(run_dir / "history.json", history)
    write_json_atomic(run_dir / "metrics.json", report.to_dict())
    _write_text(run_dir / "metrics.md", report.to_markdown() + "\n")
    config = {key: options[key] for key in kmtl_cli.TRAIN_DEFAULTS}
    for key in ("validation", "train_split", "test_split", "tensorboard"):
        config[key] = options.get(key, kmtl_cli.CONFIG_ONLY_DEFAULTS[key])
    if config["data_dir"] is not None:  # so that `kmtl evaluate` finds the data from any directory
        config["data_dir"] = os.path.abspath(os.path.expanduser(config["data_dir"]))
    write_json_atomic(run_dir / "config.json", config)
    import matplotlib.pyplot

    # No `matplotlib.use("Agg")`: that would switch a notebook's backend and hide its plots.
    # Without a display matplotlib picks Agg itself.
    fig = plots.plot_history(history, tasks=list(model.task_names))
    fig.savefig(run_dir / "curves.png", dpi=100)
    matplotlib.pyplot.close(fig)
    print(
        f"kmtl: wrote {run_dir}/ (saved_model/, model.keras, history.json, metrics.json, metrics.md, curves.png"
        + (", logs/ for TensorBoard)" if options.get("tensorboard") else ")")
    )
    backup.clear()  # the run is written: its checkpoint is not a run to resume
    seconds = sum(timer.seconds) / len(timer.seconds) if timer.seconds else float("nan")
    return TrainedRun(run_dir=run_dir, report=report, history=dict(history), seconds_per_epoch=seconds)


def _options_hash(options: dict) -> str:
    """A hash of the options of one run that change what is trained."""
    kept = {
        key: options.get(key)
        for key in sorted(set(kmtl_cli.TRAIN_DEFAULTS) | {"validation", "train_split", "test_split"})
        if key not in HASH_EXCLUDED + ("run_name",)
    }
    if options.get("architecture_options"):  # absent when empty: older checkpoints keep their fingerprint
        kept["architecture_options"] = options["architecture_options"]
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


#: Validation batches the gradient-cosine monitor reads at the end of each epoch
#: when TensorBoard logs are asked for.
TENSORBOARD_COSINE_STEPS = 4


def _tensorboard_callbacks(model, validation, log_dir: Path) -> list:
    """A gradient-cosine monitor (with two or more tasks), then Keras's TensorBoard callback.

    The monitor adds `cos_<a>_<b>` to each epoch's logs before TensorBoard
    writes them, so the event files hold, per epoch, every task's loss and
    metrics (train and validation), the task weights (`<task>_weight`) and the
    pairwise gradient cosines.
    """
    import keras

    from kmtl import diagnostics

    callbacks = []
    if len(model.task_names) > 1:
        callbacks.append(diagnostics.GradientConflictMonitor(validation, steps=TENSORBOARD_COSINE_STEPS))
    callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False))
    return callbacks


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


class Progress:
    """Progress of a long loop: `kmtl: <what> [k/n] <label> (elapsed s, about N s left)` lines.

    `begin(label)` prints the line of the next item, `end()` counts it done;
    the time left is the mean time per finished item times the items left.
    """

    def __init__(self, what: str, total: int):
        self.what, self.total, self.start, self.done = what, total, time.perf_counter(), 0

    def begin(self, label: str) -> None:
        elapsed = time.perf_counter() - self.start
        eta = ""
        if self.done:
            eta = f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        print(f"kmtl: {self.what} [{self.done + 1}/{self.total}] {label} ({elapsed:.0f} s{eta})", flush=True)

    def end(self) -> None:
        self.done += 1


def write_json_atomic(path: Path, value) -> None:
    """Writes `value` as JSON (indented, NumPy scalars as floats) with `_write_text`."""
    _write_text(path, json.dumps(value, indent=2, default=float) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Writes `text` to a temporary sibling, flushes it and moves it over `path`."""
    _atomic.replace_file(path, lambda f: f.write(text))


def _read_previous(path: Path, force: bool):
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        if force:
            return None
        raise ValueError(
            f"{path} cannot be read ({error}); pass force=True (kmtl train --force) to retrain and "
            f"overwrite it. Received: {path}"
        ) from None
    if not isinstance(previous, dict) or previous.get("kmtl_experiment") != _FORMAT:
        if force:
            return None
        raise ValueError(
            f"{path} is not a kmtl experiment record; pass force=True (kmtl train --force) to retrain "
            f"and overwrite it. Received: {path}"
        )
    return previous


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if k not in HASH_EXCLUDED and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def _result(record: dict, run_dir: Path, from_cache: bool) -> Result:
    seeds = record["config"]["seeds"]
    return Result(
        config=record["config"],
        hash=record["hash"],
        per_seed={seed: record["per_seed"][str(seed)] for seed in seeds},
        mean=record["mean"],
        std=record["std"],
        run_dir=run_dir,
        seconds_per_epoch={seed: record["seconds_per_epoch"].get(str(seed), float("nan")) for seed in seeds},
        from_cache=from_cache,
    )


def run(
    config: str | os.PathLike | Mapping,
    force: bool = False,
    out: str | os.PathLike | None = None,
    verbose: int | str | None = None,
    resume: bool = True,
) -> Result:
    """Trains a config once per seed, or returns its cached results.

    For each seed, `train_run` trains and writes what `kmtl train`
    does into `<out>/<run>/seed-<s>/`; after each seed, `<out>/<run>/experiment.json`
    is rewritten atomically (a temporary file moved over it with `os.replace`)
    with the normalised config, its hash, every finished seed's report dict and
    seconds per epoch, and the mean and std (`ddof=0`) over the seeds. Before
    each seed `keras.backend.clear_session()` frees the graphs of the runs
    before it, so that a long loop of runs does not grow.

    If `experiment.json` already holds this config's hash and every seed's
    metrics, nothing is trained: a line saying so is printed and the stored
    results are returned (`from_cache=True`). With the same hash but seeds
    missing (an interrupted run), only those seeds are trained, and a seed
    killed mid-training continues from its checkpoint
    (`<out>/<run>/seed-<s>/checkpoint/`, see `train_run`): to the same
    result as an uninterrupted run. A finished seed's checkpoint is deleted.

    Args:
        config: what `load_config` accepts.
        force: train every seed even if results are cached, and overwrite an
            experiment of another config under the same run name.
        out: the parent directory of the run; default: the config's `out`
            (whose default is `"saved_models"`).
        verbose: Keras `fit` verbosity (0, 1, 2 or `"auto"`); default: the
            config's `verbose`. Neither `out` nor `verbose` changes the hash.
        resume: continue an interrupted seed from its checkpoint; `False`
            (or `force`) deletes the checkpoint and trains the seed from the
            start. Finished seeds are reused either way (unless `force`).

    Returns:
        A `Result`.

    Raises:
        ValueError: for a bad config (see `load_config`), or when
            `<out>/<run>/` holds an experiment of another config, another kind
            of run, or an unreadable `experiment.json`, unless `force`; with
            `resume`, for a seed's checkpoint that cannot be read.
    """
    import keras

    config = load_config(config)
    try:
        if out is not None:
            config["out"] = kmtl_cli.check_train_value("out", os.fspath(out), "out")
        if verbose is not None:
            config["verbose"] = kmtl_cli.check_train_value("verbose", verbose, "verbose")
    except kmtl_cli.UsageError as error:
        raise _fail(error) from None
    digest = _hash(config)
    run_dir = Path(config["out"]) / (config["name"] or f"{config['dataset']}-{digest}")
    path = run_dir / "experiment.json"
    previous = _read_previous(path, force)
    done = {}
    if previous is not None and previous.get("hash") != digest:
        if not force:
            raise ValueError(
                f"{run_dir} holds an experiment of another config (hash {previous.get('hash')}, this one "
                f"{digest}; differences: {_differences(previous.get('config', {}), config)}). Choose another "
                f"name, or pass force=True (kmtl train --force) to retrain and overwrite it. "
                f"Received: name={run_dir.name!r}"
            )
    elif previous is not None and not force:
        done = {int(s): m for s, m in previous.get("per_seed", {}).items() if int(s) in config["seeds"]}
        if len(done) == len(config["seeds"]):
            print(
                f"kmtl: reusing the cached experiment {path} (config {digest}, seeds {config['seeds']}); "
                f"pass force=True (kmtl train --force) to retrain"
            )
            return _result(dict(previous, config=config), run_dir, from_cache=True)
        print(f"kmtl: resuming {path}: seeds {sorted(done)} are done, training the others")
    elif previous is None and run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        raise ValueError(
            f"{run_dir} exists and holds no experiment.json (another kind of run?); choose another name, "
            f"or pass force=True (kmtl train --force) to train into it. Received: name={run_dir.name!r}"
        )
    seconds = {s: previous["seconds_per_epoch"].get(str(s), float("nan")) for s in done} if done else {}
    record = {"kmtl_experiment": _FORMAT, "hash": digest, "config": config, "std_ddof": STD_DDOF}

    def write(complete: bool) -> dict:
        ordered = {s: done[s] for s in config["seeds"] if s in done}
        mean, std = summarize(ordered) if ordered else ({}, {})
        record.update(
            complete=complete,
            per_seed={str(s): m for s, m in ordered.items()},
            seconds_per_epoch={str(s): seconds[s] for s in ordered},
            mean=mean,
            std=std,
        )
        write_json_atomic(path, record)
        return record

    write(complete=False)
    for seed in config["seeds"]:
        if seed in done:
            continue
        keras.backend.clear_session()  # the finished runs' graphs are saved: free them
        trained = train_run(
            _seed_options(config, seed, run_dir),
            run_dir / f"seed-{seed}",
            resume=resume and not force,
            fingerprint=f"{digest}/seed-{seed}",
        )
        done[seed] = trained.report.to_dict()
        seconds[seed] = float(trained.seconds_per_epoch)
        write(complete=False)
    return _result(write(complete=True), run_dir, from_cache=False)


__all__ = [
    "HASH_EXCLUDED",
    "KEYS",
    "Progress",
    "STD_DDOF",
    "Result",
    "build_weighting",
    "config_hash",
    "load_config",
    "run",
    "summarize",
    "write_json_atomic",
]
