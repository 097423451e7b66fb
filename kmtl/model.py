"""`MultiTaskModel`: a functional Keras model with one named output per head."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Sequence

import keras
from keras import ops, tree
from keras.src.saving import serialization_lib

from kmtl import architectures
from kmtl import heads as heads_module
from kmtl import trunks as trunks_module
from kmtl import weighting as weighting_module


class NonFiniteLossError(FloatingPointError):
    """Raised when a task's training loss becomes NaN or infinite."""


@contextlib.contextmanager
def _label_errors(model):
    """Turns kmtl's in-graph label assertions into a plain ValueError.

    After any error the model's cached step functions are dropped, so that a
    corrected call traces afresh (a failed trace would otherwise forbid
    creating the loss trackers later).
    """
    import tensorflow as tf

    try:
        yield
    except BaseException as error:
        model.train_function = model.test_function = model.predict_function = None
        if not isinstance(error, tf.errors.InvalidArgumentError):
            raise
        text = str(error).replace("\\'", "'")
        match = re.search(
            r"assertion failed: \[(Head .*?\.)\] \[min:\] \[([^\]]*)\] \[max:\] \[([^\]]*)\]", text
        )
        if match is None:
            raise
        raise ValueError(
            f"{match.group(1)} Received: labels with min={match.group(2)}, max={match.group(3)}"
        ) from None


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


def _global_masked_mean(value, weight):
    """Makes a replica's masked-mean loss a share of the *global* masked mean.

    Keras divides each replica's weighted loss sum by that replica's own
    weight total (then by the number of replicas), which differs from the
    mean over all labelled examples when the labels are unevenly spread over
    replicas. Multiplying by `replicas * local_total / global_total` gives
    `local_sum / global_total`, whose sum over replicas is the exact mean.
    """
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    local = tf.reduce_sum(tf.cast(weight, "float32"))
    # stop_gradient on the *output*: the tape must not differentiate the
    # collective (its gradient is another collective, created per backward).
    total = tf.stop_gradient(ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(local)))
    return value * tf.math.divide_no_nan(local * ctx.num_replicas_in_sync, total)


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
        **kwargs,
    ):
        # === Config ===
        head_list = heads_module.validate(heads)
        trunk = trunks_module.get(trunk)
        spec, multi_input = _input_spec(input_shape, inputs)
        options = dict(architecture_options or {})
        builder = architectures.get(architecture)

        # === Functional Model ===
        head_names = {h.name for h in head_list}
        if multi_input:
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
        self._input_spec_config = {k: list(v) for k, v in spec.items()}
        self._multi_input = multi_input
        self._kmtl_weighting = None
        # Not tracked: they are training-only logs, not metrics of evaluate().
        object.__setattr__(self, "_weight_trackers", {})
        self.validate_targets = True

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
            weights = weights + list(strategy.trainable_weights)
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

        Args:
            optimizer: any Keras optimizer identifier.
            loss: optional dict `{head: loss}`; heads not in it use their
                default loss. `{head: None}` trains no loss for that head.
            loss_weights: optional dict `{head: float}` (missing heads: 1.0).
                With a weighting strategy, these scale each task's loss
                before the strategy sees it.
            metrics: optional dict `{head: [metrics]}`; heads not in it use
                their default metrics.
            weighting: None (static `loss_weights`), a registered name
                (`kmtl.weighting.names()`) or a `kmtl.weighting.Weighting`.
            **kwargs: other `keras.Model.compile` arguments.

        Raises:
            ValueError: for keys that match no head, a list-valued `loss`,
                `metrics` or `loss_weights` (ambiguous on dict outputs), or
                an unknown weighting name.
        """
        names = self.task_names
        loss = self._per_head("loss", loss, lambda h: h.loss())
        metrics = self._per_head("metrics", metrics, lambda h: h.metrics())
        if loss_weights is not None:
            loss_weights = self._per_head("loss_weights", loss_weights, lambda h: 1.0)
            for name, value in loss_weights.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(
                        f"Loss weight of head {name!r} must be a non-negative number. Received: {value!r}"
                    )
            loss_weights = {k: float(v) for k, v in loss_weights.items() if loss.get(k) is not None}
        if all(loss[n] is None for n in names):
            raise ValueError("Every head has loss None: nothing to train.")
        strategy = None if weighting is None else weighting_module.get(weighting)
        if strategy is not None and strategy.level == "gradient":
            if strategy.mode == "representation" and not self.supports_representation:
                raise ValueError(
                    f"Architecture {self.architecture!r} has no single shared representation; "
                    f"use mode='parameters'. Received: {type(strategy).__name__}(mode='representation')"
                )
            if kwargs.get("jit_compile") and not getattr(strategy, "jit_safe", True):
                raise ValueError(
                    f"{type(strategy).__name__} cannot run with jit_compile=True. Received: jit_compile=True"
                )
        super().compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, metrics=metrics, **kwargs)
        if strategy is not None and not strategy.built:
            strategy.build([n for n in names if loss[n] is not None])
        self._kmtl_weighting = strategy
        object.__setattr__(
            self,
            "_weight_trackers",
            {n: keras.metrics.Mean(name=f"weight_{n}") for n in names if loss[n] is not None},
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
        config = super().get_compile_config()
        if config and self._kmtl_weighting is not None:
            config = dict(config)
            config["weighting"] = keras.saving.serialize_keras_object(self._kmtl_weighting)
        return config

    def compile_from_config(self, config):
        config = serialization_lib.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    # --- targets -------------------------------------------------------------
    def _standardize_targets(self, y, sample_weight):
        """Checks target keys, shapes and dtypes at trace time."""
        names = self.task_names
        if not isinstance(y, dict):
            if len(names) == 1 and y is not None:
                y = {names[0]: y}
                if sample_weight is not None and not isinstance(sample_weight, dict):
                    sample_weight = {names[0]: sample_weight}
            else:
                raise ValueError(
                    f"Targets must be a dict keyed by head name {names}. "
                    f"Received: targets of type {type(y).__name__}"
                )
        trained = [n for n in names if self._compile_loss_for(n) is not None]
        unknown = sorted(set(y) - set(names))
        if unknown:
            raise ValueError(
                f"Target key(s) {unknown} match no head. Heads: {names}. Received target keys: {sorted(y)}"
            )
        missing = [n for n in trained if n not in y]
        if missing:
            raise ValueError(
                f"Head(s) {missing} have no target in the data. Received target keys: "
                f"{sorted(y)}. Give every head a target (with a sample weight of 0 "
                "where its label is missing), or compile with loss={name: None} "
                "for heads you do not train."
            )
        if isinstance(sample_weight, dict):
            unknown = sorted(set(sample_weight) - set(names))
            if unknown:
                raise ValueError(f"Sample-weight key(s) {unknown} match no head. Heads: {names}.")
        for name in y:
            head = self.head_map[name]
            head.check_target_spec(tuple(y[name].shape), y[name].dtype)
        return y, sample_weight

    def _compile_loss_for(self, name):
        losses = self._compile_config.config.get("loss") if hasattr(self, "_compile_config") else None
        if isinstance(losses, dict):
            return losses.get(name)
        return True

    def _value_checks(self, y, sample_weight):
        """Checks label values in graph and returns targets safe for the losses.

        Labels under a zero sample weight (missing labels) are replaced by a
        valid value, so that placeholders such as -1 neither fail the checks
        nor crash a loss kernel; they carry no weight either way. The range
        assertions are skipped under XLA (`jit_compile=True`).
        """
        import tensorflow as tf

        checked = dict(y)
        for name, target in y.items():
            bounds = self.head_map[name].label_range()
            if bounds is None:
                continue
            low, high, integer = bounds
            weight = sample_weight.get(name) if isinstance(sample_weight, dict) else sample_weight
            if weight is not None:
                weight = tf.reshape(tf.cast(weight, "float32"), [-1])
                mask = tf.reshape(weight > 0, [-1] + [1] * (len(target.shape) - 1))
                target = tf.where(mask, target, tf.cast(low, target.dtype))
                checked[name] = target
            if not self.validate_targets or self.jit_compile:
                continue
            values = tf.cast(target, "float32")
            kind = "integers" if integer else "values"
            message = f"Head {name!r}: labels must be {kind} in [{low}, {high}]."
            ok = tf.logical_and(tf.reduce_all(values >= low), tf.reduce_all(values <= high))
            if integer:
                ok = tf.logical_and(ok, tf.reduce_all(tf.equal(values, tf.round(values))))
            tf.debugging.Assert(ok, [message, "min:", tf.reduce_min(values), "max:", tf.reduce_max(values)])
        return checked

    # --- per-task losses -----------------------------------------------------
    def task_losses(self, y, y_pred, sample_weight):
        """Returns `(names, losses, loss_weights, present)` for one batch.

        `losses` are the unweighted per-task losses as Keras computes them
        (scaled by 1/replicas under a distribution strategy), the per-output
        `<task>_loss` trackers are updated, `loss_weights` are the static
        weights and `present[t]` is False when task t has no labelled example.
        """
        compile_loss = self._compile_loss
        if not compile_loss.built:
            compile_loss.build(y, y_pred)
        trackers = compile_loss.metrics
        batch = ops.shape(tree.flatten(y_pred)[0])[0]
        names, values, weights, present = [], [], [], []
        for i, (path, loss_fn, loss_weight, _) in enumerate(compile_loss._flat_losses):
            name = path[0]
            weight = sample_weight.get(name) if isinstance(sample_weight, dict) else sample_weight
            value = ops.cast(loss_fn(y[name], y_pred[name], weight), "float32")
            if weight is not None:
                value = _global_masked_mean(value, weight)
            if trackers:
                trackers[i].update_state(
                    keras.src.losses.loss.unscale_loss_for_distribution(value), sample_weight=batch
                )
            names.append(name)
            values.append(value)
            weights.append(1.0 if loss_weight is None else float(loss_weight))
            if weight is None:
                present.append(ops.convert_to_tensor(True))
            else:
                present.append(ops.sum(ops.cast(weight, "float32")) > 0)
        return names, ops.stack(values), ops.convert_to_tensor(weights, "float32"), ops.stack(present)

    def _regularization_loss(self):
        extra = [ops.sum(ops.cast(loss, "float32")) for loss in self.losses]
        return ops.sum(ops.stack(extra)) if extra else None

    # --- steps ---------------------------------------------------------------
    def train_step(self, data):
        from kmtl import training

        return training.train_step(self, data)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y, sample_weight = self._standardize_targets(y, sample_weight)
        y = self._value_checks(y, sample_weight)
        return super().test_step((x, y, sample_weight) if sample_weight is not None else (x, y))

    def reset_metrics(self):
        super().reset_metrics()
        for tracker in self._weight_trackers.values():
            tracker.reset_state()

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, plus kmtl's guard callback.

        The guard stops training with `NonFiniteLossError` naming the task
        whose loss became NaN/inf (the offending update is not applied), and
        calls the weighting strategy's `on_epoch_end`.
        """
        import tensorflow as tf

        from kmtl.callbacks import TrainingGuard

        data = args[0] if args else kwargs.get("x")
        if isinstance(data, tf.data.Dataset):
            # A dataset is shuffled by its pipeline; Keras would only warn.
            kwargs.setdefault("shuffle", False)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, TrainingGuard) for c in callbacks):
            callbacks.append(TrainingGuard())
        with _label_errors(self):
            return super().fit(*args, callbacks=callbacks, **kwargs)

    def evaluate(self, *args, **kwargs):
        with _label_errors(self):
            return super().evaluate(*args, **kwargs)

    # --- config --------------------------------------------------------------
    def get_config(self):
        inputs = self._input_spec_config
        return {
            "name": self.name,
            "heads": [keras.saving.serialize_keras_object(h) for h in self.heads],
            "trunk": keras.saving.serialize_keras_object(self.trunk),
            "input_shape": None if self._multi_input else inputs["image"],
            "inputs": inputs if self._multi_input else None,
            "architecture": self.architecture,
            "architecture_options": self.architecture_options,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["heads"] = [keras.saving.deserialize_keras_object(h) for h in config["heads"]]
        config["trunk"] = keras.saving.deserialize_keras_object(config["trunk"])
        return cls(**config)


def build_model(
    heads: Sequence,
    trunk=None,
    input_shape: Sequence[int] | None = None,
    inputs: dict | None = None,
    architecture: str = "hard_sharing",
    name: str = "multi_task_model",
    **architecture_options,
) -> MultiTaskModel:
    """Builds a multi-task model from a trunk and heads.

    Args:
        heads: list of `kmtl.heads.Head` (their names become the output keys).
        trunk: a `kmtl.trunks.Trunk` or preset name; default `trunks.dense()`
            for flat inputs and `trunks.conv()` for images.
        input_shape: shape of one input, e.g. `(28, 28, 1)`.
        inputs: dict `{input_name: shape}` for several inputs.
        architecture: one of `kmtl.architectures.names()`.
        name: model name.
        **architecture_options: options of the architecture builder (e.g.
            `num_experts` for MMoE).

    Returns:
        A `kmtl.MultiTaskModel` (uncompiled).

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
        trunk = trunks_module.conv() if len(tuple(shape)) == 3 else trunks_module.dense()
    return MultiTaskModel(
        heads=heads,
        trunk=trunk,
        input_shape=input_shape,
        inputs=inputs,
        architecture=architecture,
        architecture_options=architecture_options,
        name=name,
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
