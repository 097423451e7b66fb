"""`MultiTaskEstimator`: a scikit-learn estimator over a kmtl multi-task model.

`fit(X, y)` builds a `kmtl.MultiTaskModel` with one head per task on a dense
trunk and trains it with `model.fit`; `predict(X)` returns the targets in the
form `fit` got; `score(X, y)` is the mean over tasks of R^2 (regression) or
accuracy (classification). The constructor takes plain values only, so
`sklearn.base.clone`, `GridSearchCV`, `cross_val_score` and `Pipeline` work,
and a fitted estimator pickles (its Keras model travels as `.keras` bytes).

Targets `y` are one of:

* a dict `{task: column}` (`predict` returns a dict);
* a 2-D array, one column per task, named by `tasks` or `task_0, task_1, ...`
  (the names of `kmtl.data.synthetic_tasks`; `predict` returns a 2-D array);
* a 1-D array: one task (`predict` returns a 1-D array);
* a pandas DataFrame whose columns name the tasks (`predict` returns one).

scikit-learn's model selection (`cross_val_score`, `GridSearchCV`) slices
arrays and DataFrames but not dicts: give those an array (or DataFrame) `y`.

Example:

>>> from kmtl.data import synthetic_tasks
>>> from kmtl.sklearn import MultiTaskEstimator
>>> x, y = synthetic_tasks(num_tasks=2, correlation=0.9, num_examples=200, input_dim=8)
>>> estimator = MultiTaskEstimator(hidden_units=(16,), epochs=2, random_state=0).fit(x, y)
>>> sorted(estimator.predict(x[:5]))
['task_0', 'task_1']
"""

from __future__ import annotations

import numbers
import os
import tempfile
from typing import Sequence

import keras
import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from kmtl import architectures, trunks, weighting
from kmtl import heads as heads_module
from kmtl import model as model_module

#: The values of `task_types`.
TASK_TYPES = ("regression", "binary", "classification")

_PREDICT_BATCH = 8192


def _fail(message: str, received: str):
    raise ValueError(f"{message} Received: {received}")


def _is_frame(value) -> bool:
    return hasattr(value, "columns") and hasattr(value, "iloc") and getattr(value, "ndim", 0) == 2


def _features(X, n_features=None) -> np.ndarray:
    """`X` as a finite float32 matrix (with `n_features` columns if given)."""
    if hasattr(X, "toarray"):
        _fail("Sparse X is not supported: convert it with X.toarray().", f"X of type {type(X).__name__}")
    x = np.asarray(X)
    if x.dtype.kind == "c":
        _fail("Complex data not supported: X must be real numbers.", f"X of dtype {x.dtype}")
    try:
        x = x.astype(np.float32)
    except TypeError as error:
        raise TypeError(f"X must be real numbers: {error}. Received: X of dtype {x.dtype}") from None
    except ValueError as error:
        _fail(f"X must be real numbers: {error}.", f"X of dtype {x.dtype}")
    if x.ndim != 2 or len(x) == 0:
        _fail(
            "X must be a non-empty 2-D array (examples x features). Reshape your data either using "
            "X.reshape(-1, 1) if it has a single feature or X.reshape(1, -1) if it is a single example.",
            f"X of shape {x.shape}",
        )
    bad = ~np.isfinite(x)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        _fail(
            "X must not contain NaN or infinite values (impute them first, e.g. sklearn.impute).",
            f"{int(bad.sum())} non-finite value(s) in X, the first at row {row}, column {column}",
        )
    if n_features is not None and x.shape[1] != n_features:
        _fail(
            f"X has {x.shape[1]} features, but MultiTaskEstimator is expecting {n_features} features "
            "as input (the number it was fitted on).",
            f"X of shape {x.shape}",
        )
    return x


def _targets(y, tasks) -> tuple[list[str], dict, str, list]:
    """`(task names, {task: 1-D column}, form, DataFrame column labels)` of the targets `y`."""
    labels = []
    if y is None:
        _fail("MultiTaskEstimator requires y to be passed, but the target y is None.", "y=None")
    if isinstance(y, dict):
        form, names = "dict", [str(k) for k in y]
        columns = dict(zip(names, y.values()))
    elif _is_frame(y):
        form, labels = "frame", list(y.columns)
        names = [str(c) for c in labels]
        columns = {n: y.iloc[:, i].to_numpy() for i, n in enumerate(names)}
    else:
        y = np.asarray(y)
        if y.ndim not in (1, 2):
            _fail("y must be a dict of columns, a 1-D or 2-D array, or a DataFrame.", f"y of shape {y.shape}")
        form = "1d" if y.ndim == 1 else "array"
        y = y.reshape(len(y), -1)
        names = list(tasks) if tasks is not None else [f"task_{t}" for t in range(y.shape[1])]
        if len(names) != y.shape[1]:
            _fail(f"`tasks` must name each of the {y.shape[1]} columns of y.", f"tasks={tasks!r}")
        columns = {n: y[:, t] for t, n in enumerate(names)}
    if not names:
        _fail("y must hold at least one task.", f"y={y!r}")
    if tasks is not None and form in ("dict", "frame") and sorted(tasks) != sorted(names):
        _fail(f"`tasks` must list the tasks of y ({names}).", f"tasks={tasks!r}")
    if tasks is not None and form in ("dict", "frame"):
        names = [str(t) for t in tasks]
    for name in names:
        if not name.isidentifier():
            _fail("Task names must be valid Python identifiers (they name the model's heads).", f"{name!r}")
    out = {}
    for name in names:
        column = np.asarray(columns[name])
        if column.ndim == 2 and column.shape[1] == 1:
            column = column[:, 0]
        if column.ndim != 1:
            _fail(f"Task {name!r} must have one target per example.", f"shape {column.shape}")
        out[name] = column
    return names, out, form, labels


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        _fail(f"`{name}` must be a positive integer.", f"{name}={value!r}")
    return int(value)


class MultiTaskEstimator(RegressorMixin, BaseEstimator):
    """A scikit-learn estimator training one kmtl multi-task network for all targets.

    One head per task (a linear output for regression, a sigmoid for binary,
    a softmax for classification) on a shared dense trunk of `hidden_units`
    (or another `architecture`). Every argument is stored as given and
    checked in `fit`. One task is allowed: it gives the single-task network
    of the same shape (the per-task baseline, and what
    `sklearn.multioutput.MultiOutputRegressor` fits per column).

    With `standardize=True` (default) X and every regression target are
    standardized inside the estimator (sklearn `StandardScaler`, fitted on
    the training data) and predictions are transformed back, so the tasks'
    losses (and `loss_weights`) compare on one scale.

    Args:
        tasks: names of the columns of an array `y` (default `task_0, ...`).
        task_types: None (all regression) or `{task: "regression" | "binary" |
            "classification"}` (missing tasks: regression). Class labels
            may be any values; they are label-encoded per task.
        hidden_units: sizes of the shared Dense layers.
        architecture: a name from `kmtl.architectures.names()`.
        architecture_options: dict of the architecture's options
            (`kmtl.architectures.options(name)`), e.g. `{"num_experts": 4}`.
        loss_weights: `{task: weight}` static loss weights (missing: 1.0).
        strategy: None or a name from `kmtl.weighting.names()`.
        strategy_options: dict of the strategy's constructor arguments.
        epochs: training epochs (an upper bound with early stopping).
        batch_size: training batch size.
        learning_rate: the optimizer's learning rate.
        optimizer: a Keras optimizer name (`"adam"`, `"sgd"`, `"adamw"`, ...).
        standardize: standardize X and the regression targets (see above).
        validation_fraction: None, or a fraction in (0, 1) of the training
            examples held out to report `val_` losses in `history_`.
        early_stopping: stop when the validation loss has not improved for
            `patience` epochs and keep the best weights (holds out 0.1 of
            the examples if `validation_fraction` is None).
        patience: epochs without improvement before early stopping.
        random_state: None, an int or a `numpy.random.RandomState`. An int
            seeds Python, NumPy and Keras (`keras.utils.set_random_seed`,
            global state) at the start of `fit`: two fits agree.
        verbose: Keras `fit` verbosity.

    Attributes:
        model_: the trained `kmtl.MultiTaskModel`.
        tasks_: the task names, in target order.
        task_types_: `{task: type}`.
        task_classes_: `{task: class labels}` of the classification tasks.
        n_features_in_: number of input features.
        history_: the Keras history dict (`loss`, `<task>_loss`, ...).
        n_iter_: epochs run.

    Raises:
        ValueError (in `fit`, ending with `Received: ...`): for an invalid
            argument, an unknown architecture or strategy, `loss_weights` or
            `task_types` naming tasks not in y, X and y of different lengths,
            no task, NaN or infinite values in X or in a regression target,
            or a classification task with a single class.

    Example:

    >>> import numpy as np
    >>> from kmtl.sklearn import MultiTaskEstimator
    >>> x = np.random.default_rng(0).normal(size=(100, 4))
    >>> y = np.stack([x[:, 0], x[:, 1] > 0], axis=1)
    >>> estimator = MultiTaskEstimator(task_types={"task_1": "binary"}, epochs=2, random_state=0)
    >>> estimator.fit(x, y).predict(x[:3]).shape
    (3, 2)
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        task_types: dict | None = None,
        hidden_units: Sequence[int] = (64, 64),
        architecture: str = "hard_sharing",
        architecture_options: dict | None = None,
        loss_weights: dict | None = None,
        strategy: str | None = None,
        strategy_options: dict | None = None,
        epochs: int = 50,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        optimizer: str = "adam",
        standardize: bool = True,
        validation_fraction: float | None = None,
        early_stopping: bool = False,
        patience: int = 10,
        random_state=None,
        verbose: int = 0,
    ):
        self.tasks = tasks
        self.task_types = task_types
        self.hidden_units = hidden_units
        self.architecture = architecture
        self.architecture_options = architecture_options
        self.loss_weights = loss_weights
        self.strategy = strategy
        self.strategy_options = strategy_options
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.standardize = standardize
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.patience = patience
        self.random_state = random_state
        self.verbose = verbose

    # --- fit -------------------------------------------------------------------------------------
    def fit(self, X, y):
        """Builds and trains the network on `X` (examples x features) and targets `y`.

        Returns:
            self.
        """
        settings = self._check_settings()
        x = _features(X)
        names, columns, form, labels = _targets(y, self.tasks)
        for name, column in columns.items():
            if len(column) != len(x):
                _fail(
                    "X and y must have the same number of examples.",
                    f"{len(x)} rows in X, {len(column)} in {name!r}",
                )
        task_types = self._check_task_types(names)
        self._check_task_keys("loss_weights", self.loss_weights, names)
        seed = self._seed()

        self.tasks_, self.task_types_, self.n_features_in_ = names, task_types, x.shape[1]
        self.x_scaler_ = StandardScaler().fit(x) if self.standardize else None
        self.target_scalers_, self.task_classes_, targets, heads = {}, {}, {}, []
        for name in names:
            targets[name] = self._encode(name, task_types[name], columns[name])
            if task_types[name] == "regression":
                heads.append(heads_module.Regression(name))
            elif task_types[name] == "binary":
                heads.append(heads_module.Binary(name))
            else:
                heads.append(heads_module.Classification(name, len(self.task_classes_[name])))
        self._target_form, self._target_labels = form, labels
        if self.x_scaler_ is not None:
            x = self.x_scaler_.transform(x).astype(np.float32)

        model = model_module.build_model(
            heads,
            trunks.dense(settings["hidden_units"]),
            input_shape=(x.shape[1],),
            architecture=self.architecture,
            **settings["architecture_options"],
        )
        model.compile(
            optimizer=settings["optimizer"], loss_weights=self.loss_weights, weighting=settings["strategy"]
        )
        fit_arguments, callbacks = {}, []
        if settings["validation_fraction"]:
            x, x_val, *split = train_test_split(
                x, *targets.values(), test_size=settings["validation_fraction"], random_state=seed
            )
            targets, val = dict(zip(names, split[0::2])), dict(zip(names, split[1::2]))
            fit_arguments["validation_data"] = (x_val, val)
            if self.early_stopping:
                callbacks.append(
                    keras.callbacks.EarlyStopping(patience=int(self.patience), restore_best_weights=True)
                )
        history = model.fit(
            x,
            targets,
            epochs=settings["epochs"],
            batch_size=settings["batch_size"],
            verbose=self.verbose,
            callbacks=callbacks,
            **fit_arguments,
        )
        self.model_ = model
        self.history_ = {k: [float(v) for v in values] for k, values in history.history.items()}
        self.n_iter_ = len(self.history_.get("loss", []))
        return self

    def _check_settings(self) -> dict:
        units = (self.hidden_units,) if isinstance(self.hidden_units, numbers.Integral) else self.hidden_units
        try:
            units = tuple(_positive_int(u, "hidden_units") for u in units)
        except (TypeError, ValueError):
            units = ()
        if not units:
            _fail(
                "`hidden_units` must be a non-empty sequence of positive integers.",
                f"hidden_units={self.hidden_units!r}",
            )
        if self.architecture not in architectures.names():
            _fail(
                f"Unknown architecture. Known architectures: {', '.join(architectures.names())}.",
                f"architecture={self.architecture!r}",
            )
        for name in ("architecture_options", "loss_weights", "task_types", "strategy_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                _fail(f"`{name}` must be None or a dict.", f"{name}={value!r}")
        strategy = None
        if self.strategy is not None:
            key = str(self.strategy).lower().replace("-", "_")
            if not isinstance(self.strategy, str) or key not in weighting.names():
                _fail(
                    f"Unknown strategy. Known strategies: None, {', '.join(weighting.names())}.",
                    f"strategy={self.strategy!r}",
                )
            strategy = weighting.get(key, **(self.strategy_options or {}))
        elif self.strategy_options:
            _fail("`strategy_options` needs a `strategy`.", f"strategy_options={self.strategy_options!r}")
        if not isinstance(self.learning_rate, numbers.Real) or not self.learning_rate > 0:
            _fail("`learning_rate` must be a positive number.", f"learning_rate={self.learning_rate!r}")
        try:
            optimizer = keras.optimizers.get(
                {"class_name": self.optimizer, "config": {"learning_rate": float(self.learning_rate)}}
            )
        except (TypeError, ValueError):
            _fail(
                "`optimizer` must be a Keras optimizer name, e.g. 'adam', 'sgd', 'adamw'.",
                f"optimizer={self.optimizer!r}",
            )
        fraction = self.validation_fraction
        if fraction is None and self.early_stopping:
            fraction = 0.1
        if fraction is not None and not (isinstance(fraction, numbers.Real) and 0 < fraction < 1):
            _fail(
                "`validation_fraction` must be None or a number in (0, 1).",
                f"validation_fraction={fraction!r}",
            )
        if (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, numbers.Integral)
            or self.patience < 0
        ):
            _fail("`patience` must be an integer >= 0.", f"patience={self.patience!r}")
        return {
            "hidden_units": units,
            "architecture_options": dict(self.architecture_options or {}),
            "strategy": strategy,
            "optimizer": optimizer,
            "epochs": _positive_int(self.epochs, "epochs"),
            "batch_size": _positive_int(self.batch_size, "batch_size"),
            "validation_fraction": fraction,
        }

    def _check_task_keys(self, argument: str, value, names):
        unknown = sorted(set(value or {}) - set(names))
        if unknown:
            _fail(
                f"`{argument}` names tasks that are not in y: {unknown}. Tasks of y: {names}.",
                f"{argument}={value!r}",
            )

    def _check_task_types(self, names) -> dict:
        self._check_task_keys("task_types", self.task_types, names)
        types = {name: (self.task_types or {}).get(name, "regression") for name in names}
        for name, kind in types.items():
            if kind not in TASK_TYPES:
                _fail(f"Task types are {', '.join(TASK_TYPES)}.", f"task_types[{name!r}]={kind!r}")
        return types

    def _seed(self) -> int | None:
        """Seeds Python, NumPy and Keras from `random_state`; returns the seed (None: unseeded)."""
        state = self.random_state
        if state is None:
            return None
        if isinstance(state, numbers.Integral) and not isinstance(state, bool):
            seed = int(state)
        elif isinstance(state, np.random.RandomState):
            seed = int(check_random_state(state).randint(0, 2**31 - 1))
        else:
            _fail("`random_state` must be None, an int or a numpy RandomState.", f"random_state={state!r}")
        keras.utils.set_random_seed(seed)
        return seed

    def _encode(self, name: str, kind: str, column) -> np.ndarray:
        """A task's training targets: standardized floats, or class indices (fits the encoders)."""
        if kind == "regression":
            try:
                values = np.asarray(column, dtype=np.float64).reshape(-1, 1)
            except (TypeError, ValueError):
                _fail(
                    f"Task {name!r} is a regression task: its targets must be numbers.",
                    f"dtype={column.dtype}",
                )
            if not np.all(np.isfinite(values)):
                _fail(
                    f"Task {name!r} must not have NaN or infinite targets.",
                    f"{int((~np.isfinite(values)).sum())} such value(s)",
                )
            if self.standardize:
                self.target_scalers_[name] = StandardScaler().fit(values)
                values = self.target_scalers_[name].transform(values)
            return values[:, 0].astype(np.float32)
        encoder = LabelEncoder().fit(column)
        classes = encoder.classes_
        if len(classes) < 2 or (kind == "binary" and len(classes) != 2):
            expected = "exactly 2" if kind == "binary" else "at least 2"
            _fail(
                f"Task {name!r} ({kind}) needs {expected} classes in y.",
                f"{len(classes)} class(es): {list(classes[:5])}{' ...' if len(classes) > 5 else ''}",
            )
        self.task_classes_[name] = classes
        codes = encoder.transform(column)
        return codes.astype(np.float32 if kind == "binary" else np.int32)

    # --- predict and score -----------------------------------------------------------------------
    def predict(self, X):
        """Predicted targets, in the form `fit` got (dict, 2-D or 1-D array, or DataFrame).

        Regression predictions are on the original scale; classification
        predictions are class labels.

        Raises:
            sklearn.exceptions.NotFittedError: before `fit`.
            ValueError: for an X that is not finite or has another number of features.
        """
        columns = self._predict_columns(X)
        form = self._target_form
        if form == "dict":
            return columns
        if form == "frame":
            import pandas

            return pandas.DataFrame(
                dict(zip(self._target_labels, columns.values())), index=getattr(X, "index", None)
            )
        stacked = np.column_stack([columns[name] for name in self.tasks_])
        return stacked[:, 0] if form == "1d" else stacked

    def _predict_columns(self, X) -> dict:
        check_is_fitted(self, "model_")
        x = _features(X, self.n_features_in_)
        if self.x_scaler_ is not None:
            x = self.x_scaler_.transform(x).astype(np.float32)
        chunks = []
        for start in range(0, len(x), _PREDICT_BATCH):
            outputs = self.model_(x[start : start + _PREDICT_BATCH], training=False)
            chunks.append({name: keras.ops.convert_to_numpy(outputs[name]) for name in self.tasks_})
        columns = {}
        for name in self.tasks_:
            output = np.concatenate([c[name] for c in chunks])
            kind = self.task_types_[name]
            if kind == "regression":
                if name in self.target_scalers_:
                    output = self.target_scalers_[name].inverse_transform(output)
                columns[name] = output[:, 0].astype(np.float64)
            elif kind == "binary":
                columns[name] = self.task_classes_[name][(output[:, 0] > 0.5).astype(int)]
            else:
                columns[name] = self.task_classes_[name][np.argmax(output, axis=1)]
        return columns

    def score_per_task(self, X, y) -> dict:
        """`{task: score}`: R^2 (`sklearn.metrics.r2_score`) for regression tasks, accuracy otherwise.

        `y` is in any accepted form holding the fitted tasks (an array:
        one column per task, in the fitted order).
        """
        check_is_fitted(self, "model_")
        tasks = None if isinstance(y, dict) or _is_frame(y) else self.tasks_
        names, columns, _, _ = _targets(y, tasks)
        if sorted(names) != sorted(self.tasks_):
            _fail(f"y must hold the fitted tasks {self.tasks_}.", f"tasks {names}")
        predictions = self._predict_columns(X)
        scores = {}
        for name in self.tasks_:
            if len(columns[name]) != len(predictions[name]):
                _fail(
                    "X and y must have the same number of examples.",
                    f"{len(predictions[name])} rows in X, {len(columns[name])} in {name!r}",
                )
            if self.task_types_[name] == "regression":
                scores[name] = float(r2_score(np.asarray(columns[name], dtype=np.float64), predictions[name]))
            else:
                scores[name] = float(accuracy_score(columns[name], predictions[name]))
        return scores

    def score(self, X, y, sample_weight=None) -> float:
        """The mean over tasks of `score_per_task` (R^2 for regression, accuracy for classification).

        For all-regression tasks this is `r2_score(y, predict(X),
        multioutput="uniform_average")`. `sample_weight` is not supported.
        """
        if sample_weight is not None:
            _fail("`score` takes no sample_weight.", "sample_weight")
        return float(np.mean(list(self.score_per_task(X, y).values())))

    # --- scikit-learn tags and pickling ----------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def __getstate__(self):
        """The estimator's state, with a fitted Keras model as `.keras` file bytes."""
        state = dict(super().__getstate__())
        model = state.pop("model_", None)
        if model is not None:
            with tempfile.TemporaryDirectory() as directory:
                path = os.path.join(directory, "model.keras")
                model.save(path)
                with open(path, "rb") as file:
                    state["model_keras_bytes"] = file.read()
        return state

    def __setstate__(self, state):
        state = dict(state)
        data = state.pop("model_keras_bytes", None)
        if data is not None:
            with tempfile.TemporaryDirectory() as directory:
                path = os.path.join(directory, "model.keras")
                with open(path, "wb") as file:
                    file.write(data)
                state["model_"] = keras.saving.load_model(path)
        super().__setstate__(state)


__all__ = ["TASK_TYPES", "MultiTaskEstimator"]
