"""`MultiTaskModel`: a functional Keras model with one named output per head."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from typing import Sequence

import keras

from kmtl import architectures, backend, logs
from kmtl import heads as heads_module
from kmtl import inputs as inputs_module
from kmtl import trunks as trunks_module
from kmtl import weighting as weighting_module
from kmtl.callbacks import TrainingGuard
from kmtl.objective import TaskObjective

#: `keras.Model.compile` arguments kept in the compile config besides kmtl's own.
_KERAS_COMPILE_ARGUMENTS = (
    "run_eagerly",
    "steps_per_execution",
    "jit_compile",
    "auto_scale_loss",
)


def _input_spec(input_shape, inputs):
    """Returns `{name: shape}` (or `None` name for a single input)."""
    if (input_shape is None) == (inputs is None):
        raise ValueError(
            "Give exactly one of `input_shape` (one image/feature input) and `inputs` "
            f"(a dict of input shapes). Received: input_shape={input_shape!r}, inputs={inputs!r}"
        )
    if input_shape is not None:
        shape = tuple(input_shape)
        if not shape or any(not isinstance(d, int) or d < 1 for d in shape if d is not None):
            raise ValueError(
                f"`input_shape` must be a tuple of positive ints (without the batch "
                f"dimension). Received: input_shape={input_shape!r}"
            )
        return {"image": shape}, False
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError(f"`inputs` must be a non-empty dict of shapes. Received: inputs={inputs!r}")
    spec = {}
    for name, shape in inputs.items():
        if hasattr(shape, "shape") and not isinstance(shape, (tuple, list)):
            shape = tuple(shape.shape[1:])
        spec[str(name)] = tuple(shape)
    return spec, True


#: Architectures that cannot read tabular features, and why.
_NO_FEATURES = {
    "task_routed": "routes a separate input to each task; features are one shared set of inputs",
    "mtan": "attends over the feature maps of a conv trunk; encoded features are one flat vector",
}


def _feature_parts(builder, architecture, features, trunk, heads, options):
    """`(raw inputs, Parts, the encoder's copy of the features)` of a model on tabular features.

    The architecture is built on a placeholder for the encoded vector; the
    `FeatureEncoder` is then put in front of its encoder, so that the shared
    encoder maps the raw inputs to the representation and holds the
    embedding tables (and, for chain encoders, is the first stage).
    """
    if architecture in _NO_FEATURES:
        raise ValueError(
            f"Architecture {architecture!r} cannot take `features`: it {_NO_FEATURES[architecture]}. "
            f"Use one of {[a for a in architectures.names() if a not in _NO_FEATURES]}. "
            f"Received: architecture={architecture!r}"
        )
    if trunk.kind == "conv":
        raise ValueError(
            "Tabular features are encoded into one flat vector, which a conv trunk cannot read; use a "
            f"dense trunk (e.g. kmtl.trunks.dense((64, 32))). Received: trunk={trunk!r}"
        )
    # Keras layer names are unique in a model: an input named like a head (a
    # decoder) or an encoder layer gets the layer name "<name>_input"; the
    # dict key, used by data and signatures, stays the feature name.
    reserved = {h.name for h in heads} | {"encoder", "feature_encoder", "encoded_features"}
    raw = {
        name: keras.Input(shape=shape, dtype=dtype, name=f"{name}_input" if name in reserved else name)
        for name, (shape, dtype) in features.input_specs().items()
    }
    encode = inputs_module.FeatureEncoder(features, name="feature_encoder")
    parts = builder(
        keras.Input(shape=(features.output_dim,), name="encoded_features"), trunk, heads, **options
    )
    encoder = keras.Model(raw, parts.encoder(encode(raw)), name="encoder")
    stages = [encode, *parts.stages] if parts.stages else None
    return raw, dataclasses.replace(parts, encoder=encoder, stages=stages), encode.features


#: Keras's in-graph error for a value outside a `num_oov_indices=0` vocabulary, and the
#: lookup layer (`<feature>_lookup`, see `kmtl.inputs`) in the failing node's name.
_OOV_ERROR = re.compile(
    r"When `num_oov_indices=0` all inputs should be in vocabulary, found OOV values ([^\n]*?),"
)
_OOV_NODE = re.compile(r"feature_encoder(?:_\d+)?/([A-Za-z_][A-Za-z0-9_]*?)_lookup(?:_\d+)?/")


@keras.saving.register_keras_serializable(package="kmtl")
class MultiTaskModel(keras.Model):
    """A multi-task Keras model: shared encoder, one decoder and output per head.

    Built functionally from a trunk, a list of heads and an architecture (see
    `kmtl.build_model`). Outputs are a dict keyed by head name. `compile`
    fills the per-output losses and metrics from the heads and accepts a
    `weighting` strategy; `fit`, `evaluate`, `predict`, `.keras` saving and
    SavedModel export work as for any Keras model.

    Shared variables (`shared_variables`) are the encoder's trainable
    variables; each head's decoder variables are task-specific
    (`task_variables[name]`). Which layers form the encoder depends on the
    architecture (see its builder's docstring).

    Args:
        heads: list of `kmtl.heads.Head` (unique names).
        trunk: a `kmtl.trunks.Trunk` (or preset name / config dict).
        input_shape: shape of the single input (without batch dimension).
        inputs: alternatively, a dict `{input_name: shape}` for
            architectures with several inputs (e.g. `task_routed`).
        architecture: a name from `kmtl.architectures.names()`.
        architecture_options: keyword arguments of the architecture builder.
        name: model name.
        features: alternatively to `input_shape` and `inputs`, an adapted
            `kmtl.inputs.Features`: the model takes one raw input per
            feature (a dict keyed by feature name, shape `()` per example,
            `(width,)` for multi-categorical features) and its encoder
            starts with a `kmtl.inputs.FeatureEncoder`, so the embedding
            tables are shared variables. `fit`, `evaluate` and `predict`
            check the raw columns (`Features.standardize`).

    Raises:
        ValueError: for invalid heads, trunk, architecture or options; for
            `features` together with `input_shape`/`inputs`, an unadapted
            `features`, or an architecture or trunk that cannot read them.
    """

    def __init__(
        self,
        heads: Sequence,
        trunk,
        input_shape: Sequence[int] | None = None,
        inputs: dict | None = None,
        architecture: str = "hard_sharing",
        architecture_options: dict | None = None,
        name: str = "multi_task_model",
        features=None,
        **kwargs,
    ):
        # === Config ===
        head_list = heads_module.validate(heads)
        trunk = trunks_module.get(trunk)
        if features is not None:
            if input_shape is not None or inputs is not None:
                raise ValueError(
                    "`features` defines the model inputs: give it instead of `input_shape` and `inputs`. "
                    f"Received: input_shape={input_shape!r}, inputs={inputs!r} and features"
                )
            features = inputs_module.get(features)
            features.check_adapted("MultiTaskModel")
            spec, multi_input = {name: shape for name, (shape, _) in features.input_specs().items()}, True
        else:
            spec, multi_input = _input_spec(input_shape, inputs)
        options = dict(architecture_options or {})
        builder = architectures.get(architecture)

        # === Functional Model ===
        head_names = {h.name for h in head_list}
        if features is not None:
            model_inputs = None  # made by `_feature_parts`
        elif multi_input:
            # Decoders are named after their heads, and Keras layer names must
            # be unique: an input keyed like a head gets the layer name
            # "<key>_input" (the dict key, used by data and signatures, stays).
            model_inputs = {
                k: keras.Input(shape=s, name=f"{k}_input" if k in head_names else k) for k, s in spec.items()
            }
        else:
            model_inputs = keras.Input(shape=spec["image"], name="image")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="When providing `inputs` as a dict")
            if features is not None:
                model_inputs, parts, features = _feature_parts(
                    builder, architecture, features, trunk, head_list, options
                )
            else:
                parts = builder(model_inputs, trunk, head_list, **options)
            if set(parts.decoders) != head_names:
                raise ValueError(
                    f"Architecture {architecture!r} returned decoders for {sorted(parts.decoders)} "
                    f"but the heads are {[h.name for h in head_list]}."
                )
            representation = parts.encoder(model_inputs)
            outputs = {h.name: parts.decoders[h.name](representation) for h in head_list}
            super().__init__(inputs=model_inputs, outputs=outputs, name=name, **kwargs)

        self.encoder = parts.encoder
        self.decoders = dict(parts.decoders)
        self.heads = head_list
        self.trunk = trunk
        self.architecture = architecture
        self.architecture_options = options
        self.supports_representation = parts.supports_representation
        self.shared_description = parts.shared_description
        #: Heads with no loss by default (they learn through another head's output).
        self.untrained_heads = tuple(parts.untrained)
        self._input_spec_config = {k: list(v) for k, v in spec.items()}
        self._multi_input = multi_input
        #: The tabular input spec (`kmtl.inputs.Features`), or None.
        self.features = features
        self._kmtl_weighting = None
        # The encoder as a chain of stages (None if it is not one): not tracked
        # again by Keras, the layers already belong to the encoder.
        object.__setattr__(self, "encoder_stages", tuple(parts.stages) if parts.stages else None)

    # --- structure -----------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [h.name for h in self.heads]

    @property
    def head_map(self) -> dict:
        return {h.name: h for h in self.heads}

    @property
    def shared_variables(self) -> list:
        """Trainable variables shared by the tasks (the encoder's)."""
        return list(self.encoder.trainable_variables)

    @property
    def task_variables(self) -> dict:
        """`{task: trainable variables used by that task only}`."""
        return {name: list(d.trainable_variables) for name, d in self.decoders.items()}

    @property
    def weighting(self):
        """The compiled weighting strategy, or None for static loss weights."""
        return self._kmtl_weighting

    @property
    def trainable_weights(self):
        weights = super().trainable_weights
        strategy = getattr(self, "_kmtl_weighting", None)
        if strategy is not None and strategy.trainable_weights:
            known = {id(w) for w in weights}
            weights = weights + [w for w in strategy.trainable_weights if id(w) not in known]
        return weights

    # --- compile -------------------------------------------------------------
    def compile(
        self,
        optimizer="adam",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighting=None,
        **kwargs,
    ):
        """Configures training; losses and metrics default to the heads'.

        Builds the model's `objective` (a `kmtl.TaskObjective`: per-task
        losses, static weights, checks and trackers) and compiles the Keras
        model with the per-head metrics. Every other `keras.Model.compile`
        argument is accepted.

        Args:
            optimizer: any Keras optimizer identifier.
            loss: optional dict `{head: loss}`; heads not in it use their
                default loss (none for the architecture's `untrained_heads`,
                e.g. ESMM's conversion head). `{head: None}` trains no loss for that head.
                A `keras.losses.Loss` keeps its reduction; a loss function or
                name uses Keras's default (`sum_over_batch_size`).
            loss_weights: optional dict `{head: weight}` (missing heads: 1.0),
                finite numbers >= 0 (Python or NumPy). With a weighting
                strategy, these scale each task's loss before the strategy
                sees it.
            metrics: optional dict `{head: [metrics]}`; heads not in it use
                their default metrics. Metrics take the sample weights into
                account (Keras's `weighted_metrics`), so an example whose
                label is missing (weight 0) does not count; `weighted_metrics`
                (a dict like `metrics`) is accepted and appended to them.
            weighting: None (static `loss_weights`), a registered name
                (`kmtl.weighting.names()`) or a `kmtl.weighting.Weighting`.
            **kwargs: other `keras.Model.compile` arguments.

        Raises:
            ValueError: for keys that match no head, a list-valued `loss`,
                `metrics` or `loss_weights` (ambiguous on dict outputs),
                non-finite or negative loss weights, or an unknown weighting
                name.
        """
        loss = self._per_head("loss", loss, lambda h: None if h.name in self.untrained_heads else h.loss())
        metrics = self._per_head("metrics", metrics, lambda h: h.metrics())
        extra = kwargs.pop("weighted_metrics", None)
        if extra is not None:
            extra = self._per_head("weighted_metrics", extra, lambda h: [])
            metrics = {name: list(metrics[name] or []) + list(extra[name] or []) for name in metrics}
        if loss_weights is not None:
            loss_weights = self._per_head("loss_weights", loss_weights, lambda h: 1.0)
        objective = TaskObjective(self.heads, loss, loss_weights)
        strategy = None if weighting is None else weighting_module.get(weighting)
        if strategy is not None and strategy.level == "gradient":
            if strategy.mode == "representation" and not self.supports_representation:
                raise ValueError(
                    f"Architecture {self.architecture!r} has no single shared representation; "
                    f"use mode='parameters'. Received: {type(strategy).__name__}(mode='representation')"
                )
            if getattr(strategy, "mode", None) == "parameters" and not self.shared_variables:
                raise ValueError(
                    f"{type(strategy).__name__} combines the tasks' gradients of the shared parameters, and "
                    f"this model has none (e.g. hard_sharing with shared_depth=0): use a loss-level "
                    f"strategy or mode='representation'. Received: {type(strategy).__name__}(mode='parameters')"
                )
            if kwargs.get("jit_compile") and not strategy.jit_safe:
                raise ValueError(
                    f"{type(strategy).__name__} cannot run with jit_compile=True. Received: jit_compile=True"
                )
        # Weighted metrics: a zero sample weight marks a missing label, which
        # must not count (the objective replaced it by a placeholder value).
        super().compile(optimizer=optimizer, loss=None, weighted_metrics=metrics, **kwargs)
        if strategy is not None:
            if strategy.built and strategy.task_names != objective.task_names:
                raise ValueError(
                    f"{type(strategy).__name__} was built for tasks {strategy.task_names}, but the model "
                    f"trains {objective.task_names}. Received: a strategy built for other tasks"
                )
            if not strategy.built:
                strategy.build(objective.task_names)
        objective.validate_targets = self.validate_targets and not self.jit_compile
        # Not tracked by Keras: the objective's trackers are reported through `metrics`.
        object.__setattr__(self, "objective", objective)
        self._kmtl_weighting = strategy
        # Untracked too: they are saved as the compile config, not as state.
        object.__setattr__(
            self,
            "compile_arguments",
            {
                "optimizer": self.optimizer,
                "loss": loss,
                "loss_weights": None
                if loss_weights is None
                else dict(zip(objective.task_names, objective.static_weights)),
                "metrics": metrics,
                "weighting": strategy,
                **{k: v for k, v in kwargs.items() if k in _KERAS_COMPILE_ARGUMENTS},
            },
        )

    def _per_head(self, argument, value, default):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            if len(self.heads) == 1 and argument != "loss_weights":
                value = {self.heads[0].name: value}
            else:
                raise ValueError(
                    f"`{argument}` must be a dict keyed by head name ({self.task_names}); "
                    f"lists are matched to outputs in sorted-key order by Keras. "
                    f"Received: {argument}={value!r}"
                )
        unknown = sorted(set(value) - set(self.task_names))
        if unknown:
            raise ValueError(
                f"`{argument}` has keys that match no head: {unknown}. Heads: "
                f"{self.task_names}. Received: {argument}={value!r}"
            )
        return {h.name: value[h.name] if h.name in value else default(h) for h in self.heads}

    def get_compile_config(self):
        """kmtl's compile arguments (optimizer, per-head losses and metrics, weights, strategy)."""
        arguments = getattr(self, "compile_arguments", None)
        if not self.compiled or arguments is None:
            return {}
        return {k: keras.saving.serialize_keras_object(v) for k, v in arguments.items()}

    def compile_from_config(self, config):
        config = {k: keras.saving.deserialize_keras_object(v) for k, v in config.items()}
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def validate_targets(self) -> bool:
        """Whether label values are checked in the graph (never under XLA)."""
        return getattr(self, "_validate_targets", True)

    @validate_targets.setter
    def validate_targets(self, value: bool):
        object.__setattr__(self, "_validate_targets", bool(value))
        objective = getattr(self, "objective", None)
        if objective is not None:
            objective.validate_targets = bool(value) and not self.jit_compile
            self.train_function = self.test_function = None

    # --- metrics and log keys ------------------------------------------------
    @property
    def metrics(self):
        """kmtl's `loss` and `<task>_loss` trackers, then Keras's compiled and layer metrics."""
        keras_metrics = list(super().metrics)
        objective = getattr(self, "objective", None)
        if objective is None or not self.compiled:
            return keras_metrics
        if (
            keras_metrics
            and isinstance(keras_metrics[0], keras.metrics.Mean)
            and keras_metrics[0].name == "loss"
        ):
            # Keras's own total-loss tracker: kmtl's objective reports the total instead.
            keras_metrics = keras_metrics[1:]
        return objective.metrics(training=False) + keras_metrics

    def reset_metrics(self):
        super().reset_metrics()
        objective = getattr(self, "objective", None)
        if objective is not None:
            objective.weight_tracker.reset_state()

    def get_metrics_result(self):
        """Keras's metric results, every per-task metric keyed `<task>_<metric>`.

        Keras drops the output name from the metrics of a one-output model
        (`accuracy`, not `digit_accuracy`); kmtl's keys keep it, so a
        single-task model logs like any other.
        """
        result = super().get_metrics_result()
        if len(self.heads) != 1 or not self.compiled:
            return result
        task = self.heads[0].name
        names = set(self.log_keys().metrics[task]) - {"loss", "weight"}
        return {
            (logs.key(task, name) if name in names and logs.key(task, name) not in result else name): value
            for name, value in result.items()
        }

    def log_keys(self) -> logs.LogKeys:
        """The per-task log keys of this compiled model (`kmtl.logs.LogKeys`)."""
        per_task = {h.name: [] for h in self.heads}
        objective = getattr(self, "objective", None)
        for name in objective.task_names if objective is not None else []:
            per_task[name] += ["loss", "weight"]
        metrics = (getattr(self, "compile_arguments", None) or {}).get("metrics") or {}
        for name, items in metrics.items():
            for metric in items or []:
                metric_name = metric if isinstance(metric, str) else getattr(metric, "name", None)
                if metric_name and metric_name not in per_task[name]:
                    per_task[name].append(metric_name)
        return logs.LogKeys(per_task)

    # --- steps ---------------------------------------------------------------
    def train_step(self, data):
        return backend.train_step(self, data)

    def test_step(self, data):
        return backend.test_step(self, data)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The static-weighted total loss of a batch (this replica's share), from the objective."""
        targets, weights = self.objective.prepare(y, sample_weight)
        losses = self.objective.task_losses(targets, y_pred, weights, self.losses)
        total = keras.ops.sum(losses.shares)
        if losses.regularization_share is not None:
            total = total + losses.regularization_share
        return total

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, plus kmtl's guard callback.

        The guard stops training with `kmtl.NonFiniteLossError` naming the
        task whose loss or gradient became NaN/inf; that batch changed
        nothing (weights, optimizer state and iterations, strategy state).
        It also calls the weighting strategy's `on_epoch_end`. A
        `tf.data.Dataset` is not reshuffled by Keras (`shuffle=False` unless
        given): its pipeline shuffles.
        """
        data = args[0] if args else kwargs.get("x")
        if type(data).__name__.endswith("Dataset"):
            kwargs.setdefault("shuffle", False)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, TrainingGuard) for c in callbacks):
            callbacks.append(TrainingGuard())
        args, kwargs = self._standardize_features("fit", args, kwargs)
        with self._feature_errors(), backend.translate_errors(self):
            return super().fit(*args, callbacks=callbacks, **kwargs)

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate`; a feature model checks its raw columns first."""
        args, kwargs = self._standardize_features("evaluate", args, kwargs)
        with self._feature_errors(), backend.translate_errors(self):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        """`keras.Model.predict`; a feature model checks its raw columns first."""
        args, kwargs = self._standardize_features("predict", args, kwargs)
        with self._feature_errors():
            return super().predict(*args, **kwargs)

    # --- raw feature inputs --------------------------------------------------
    def _standardize_features(self, method, args, kwargs):
        """Checks (and converts) the `x` and `validation_data` inputs of a feature model.

        Keras slices no NumPy string arrays, warns about and ignores unknown
        dict keys, and fails on a wrong dtype deep in the graph: the spec's
        `standardize` gives a `ValueError` naming the feature instead, and
        turns string columns into tensors.
        """
        features = getattr(self, "features", None)
        if features is None:
            return args, kwargs
        if args:
            args = (features.standardize(args[0], method), *args[1:])
        elif "x" in kwargs:
            kwargs = {**kwargs, "x": features.standardize(kwargs["x"], method)}
        validation = kwargs.get("validation_data")
        if isinstance(validation, (tuple, list)) and validation:
            x = features.standardize(validation[0], f"{method} (validation_data)")
            kwargs = {**kwargs, "validation_data": (x, *validation[1:])}
        elif validation is not None:
            kwargs = {
                **kwargs,
                "validation_data": features.standardize(validation, f"{method} (validation_data)"),
            }
        return args, kwargs

    @contextlib.contextmanager
    def _feature_errors(self):
        """Turns Keras's in-graph out-of-vocabulary error (`num_oov_indices=0`) into a `ValueError`."""
        try:
            yield
        except Exception as error:
            features = getattr(self, "features", None)
            match = _OOV_ERROR.search(str(error))
            if features is None or match is None:
                raise
            strict = [f.name for f in features if getattr(f, "num_oov_indices", 1) == 0]
            node = _OOV_NODE.search(str(error))
            named = [node.group(1)] if node is not None and node.group(1) in strict else strict
            values = match.group(1).replace('\\"', '"')
            raise ValueError(
                f"Feature {' or '.join(repr(n) for n in named)} received a value outside its vocabulary: "
                f"with num_oov_indices=0 unseen values are an error (num_oov_indices=1 maps them to a "
                f"learned OOV embedding). Received: out-of-vocabulary values {values}"
            ) from None

    # --- config --------------------------------------------------------------
    def get_config(self):
        inputs = self._input_spec_config
        return {
            "name": self.name,
            "heads": [keras.saving.serialize_keras_object(h) for h in self.heads],
            "trunk": keras.saving.serialize_keras_object(self.trunk),
            "input_shape": None if self._multi_input else inputs["image"],
            "inputs": inputs if self._multi_input and self.features is None else None,
            "architecture": self.architecture,
            "architecture_options": self.architecture_options,
            "features": None if self.features is None else keras.saving.serialize_keras_object(self.features),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["heads"] = [keras.saving.deserialize_keras_object(h) for h in config["heads"]]
        config["trunk"] = keras.saving.deserialize_keras_object(config["trunk"])
        if config.get("features") is not None:
            config["features"] = inputs_module.get(config["features"])
        return cls(**config)


def build_model(
    heads: Sequence,
    trunk=None,
    input_shape: Sequence[int] | None = None,
    inputs: dict | None = None,
    architecture: str = "hard_sharing",
    name: str = "multi_task_model",
    features=None,
    **architecture_options,
) -> MultiTaskModel:
    """Builds a multi-task model from a trunk and heads.

    Args:
        heads: list of `kmtl.heads.Head` (their names become the output keys).
        trunk: a `kmtl.trunks.Trunk` or preset name; default `trunks.dense()`
            for flat inputs and tabular features, `trunks.conv()` for images.
        input_shape: shape of one input, e.g. `(28, 28, 1)`.
        inputs: dict `{input_name: shape}` for several inputs.
        architecture: one of `kmtl.architectures.names()`.
        name: model name.
        features: instead of `input_shape`/`inputs`, an adapted
            `kmtl.inputs.Features`: the model takes the raw columns, one
            input per feature (see `kmtl.inputs`).
        **architecture_options: options of the architecture builder (e.g.
            `num_experts` for MMoE).

    Returns:
        A `kmtl.MultiTaskModel` (uncompiled).

    Raises:
        ValueError: see `kmtl.MultiTaskModel`.

    Example:

    >>> import kmtl
    >>> from kmtl import heads, trunks
    >>> model = kmtl.build_model(
    ...     heads=[heads.Classification("digit", 10), heads.Binary("parity")],
    ...     trunk=trunks.dense((64,)), input_shape=(8, 8, 1))
    >>> sorted(model.output_names)
    ['digit', 'parity']
    """
    if trunk is None:
        shape = input_shape if input_shape is not None else next(iter((inputs or {}).values()), ())
        flat = features is not None or len(tuple(shape)) != 3
        trunk = trunks_module.dense() if flat else trunks_module.conv()
    return MultiTaskModel(
        heads=heads,
        trunk=trunk,
        input_shape=input_shape,
        inputs=inputs,
        architecture=architecture,
        architecture_options=architecture_options,
        name=name,
        features=features,
    )


def compile_model(model: keras.Model, heads: Sequence, loss_weights=None, weighting=None, **kwargs):
    """Compiles any dict-output Keras model with the heads' losses and metrics.

    The explicit form of `MultiTaskModel.compile`: passes a per-output `loss`
    dict, `loss_weights` dict and `metrics` dict to `model.compile`.

    Raises:
        ValueError: if a head has no matching model output.
    """
    head_list = heads_module.validate(heads)
    if isinstance(model, MultiTaskModel):
        model.compile(loss_weights=loss_weights, weighting=weighting, **kwargs)
        return model
    if weighting is not None:
        raise ValueError(
            "Weighting strategies need a kmtl.MultiTaskModel (see kmtl.build_model). "
            f"Received: model of type {type(model).__name__}"
        )
    outputs = list(model.output_names)
    missing = [h.name for h in head_list if h.name not in outputs]
    if missing:
        raise ValueError(f"Head(s) {missing} match no model output. Model outputs: {outputs}.")
    model.compile(
        loss={h.name: h.loss() for h in head_list},
        metrics={h.name: h.metrics() for h in head_list},
        loss_weights=None
        if loss_weights is None
        else {h.name: float(loss_weights.get(h.name, 1.0)) for h in head_list},
        **kwargs,
    )
    return model
