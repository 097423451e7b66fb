import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import kmtl
from kmtl import heads, trunks


@keras.saving.register_keras_serializable(package="kmtl_tests")
class SumOfGradients(kmtl.weighting.Weighting):
    """Gradient-level test strategy: plain sum of task gradients (= equal weights)."""

    level = "gradient"
    gram_based = True

    def weights_from_gram(self, gram, values, present, step, state):
        return ops.cast(present, "float32"), {}


def _data(n=64, seed=0, tasks=("digit", "parity")):
    """Learnable synthetic data: the digit is written as a bright pixel."""
    rng = np.random.default_rng(seed)
    digit = rng.integers(0, 10, n)
    x = 0.2 * rng.random((n, 8, 8, 1)).astype("float32")
    x[np.arange(n), digit // 8, digit % 8, 0] += 1.0
    y = {"digit": digit, "parity": (digit % 2).astype("float32"), "value": digit.astype("float32")}
    return x, {t: y[t] for t in tasks}


def _model(weighting=None, tasks=("digit", "parity"), optimizer=None, **compile_kwargs):
    keras.utils.set_random_seed(1)
    all_heads = {
        "digit": heads.Classification("digit", 10),
        "parity": heads.Binary("parity"),
        "value": heads.Regression("value"),
    }
    model = kmtl.build_model(
        heads=[all_heads[t] for t in tasks], trunk=trunks.dense((16,)), input_shape=(8, 8, 1)
    )
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1), weighting=weighting, **compile_kwargs)
    return model


def _max_diff(a, b):
    return max(float(np.abs(u - v).max()) for u, v in zip(a.get_weights(), b.get_weights()))


def test_build_and_structure():
    model = _model(tasks=("digit", "parity", "value"))
    assert isinstance(model, kmtl.MultiTaskModel) and isinstance(model, keras.Model)
    assert sorted(model.output_names) == ["digit", "parity", "value"]
    out = model.predict(np.zeros((2, 8, 8, 1)), verbose=0)
    assert set(out) == {"digit", "parity", "value"} and out["digit"].shape == (2, 10)
    shared = {id(v) for v in model.shared_variables}
    task = [{id(v) for v in vs} for vs in model.task_variables.values()]
    assert shared and all(vs and not (vs & shared) for vs in task)
    assert shared.union(*task) == {id(v) for v in model.trainable_variables}


def test_fit_history_names_and_loss_weights():
    x, y = _data(tasks=("digit", "parity", "value"))
    model = _model(
        tasks=("digit", "parity", "value"), loss_weights={"digit": 1.0, "parity": 0.5, "value": 0.1}
    )
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_data=(x, y))
    keys = set(history.history)
    for name in (
        "digit_loss",
        "parity_loss",
        "value_loss",
        "digit_accuracy",
        "parity_auc",
        "value_mae",
        "val_digit_accuracy",
        "digit_weight",
        "loss",
    ):
        assert name in keys, name
    assert not any(k.startswith("val_weight") for k in keys)
    assert history.history["parity_weight"] == [0.5, 0.5]
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    expected = logs["digit_loss"] + 0.5 * logs["parity_loss"] + 0.1 * logs["value_loss"]
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)


def test_a_one_head_model_keeps_the_task_prefix_in_its_logs_and_report():
    x, y = _data(tasks=("parity",))
    model = _model(tasks=("parity",))
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0, validation_data=(x, y))
    assert {"parity_accuracy", "parity_auc", "val_parity_auc", "parity_loss", "loss"} <= set(history.history)
    assert not {"accuracy", "auc", "val_accuracy"} & set(history.history)
    report = kmtl.evaluate(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(32))
    assert set(report["parity"]) == {"loss", "accuracy", "auc"}


def test_training_loss_decreases_on_learnable_data():
    x, y = _data(256)
    model = _model(optimizer=keras.optimizers.Adam(1e-2))
    before = model.evaluate(x, y, return_dict=True, verbose=0)
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    after = model.evaluate(x, y, return_dict=True, verbose=0)
    assert after["digit_loss"] < before["digit_loss"] and after["parity_loss"] < before["parity_loss"]


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_gradient_engine_matches_static_sum(mode):
    x, y = _data()
    reference = _model()
    reference.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    model = _model(SumOfGradients(mode=mode))
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    assert _max_diff(reference, model) < 1e-5
    assert history.history["digit_weight"] == [1.0, 1.0]


def test_gradient_engine_update_every_matches_static_sum():
    x, y = _data()
    reference = _model()
    reference.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    model = _model(SumOfGradients(update_every=3))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    assert _max_diff(reference, model) < 1e-5


def test_heads_get_their_own_gradient_only():
    x, y = _data(16)

    @keras.saving.register_keras_serializable(package="kmtl_tests")
    class OnlyFirst(kmtl.weighting.Weighting):
        level = "gradient"
        gram_based = True

        def weights_from_gram(self, gram, values, present, step, state):
            return ops.convert_to_tensor([1.0, 0.0]), {}

    model = _model(OnlyFirst())
    before = [v.numpy().copy() for v in model.task_variables["parity"]]
    shared_before = [v.numpy().copy() for v in model.shared_variables]
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert any(np.abs(b - v.numpy()).max() > 0 for b, v in zip(before, model.task_variables["parity"]))
    # The shared update follows the digit task alone.
    reference = _model(tasks=("digit", "parity"), loss_weights={"digit": 1.0, "parity": 0.0})
    reference.fit(x, y, epochs=1, batch_size=16, verbose=0)
    for r, m, b in zip(reference.shared_variables, model.shared_variables, shared_before):
        np.testing.assert_allclose(r.numpy(), m.numpy(), atol=1e-6)
        assert np.abs(m.numpy() - b).max() > 0


def test_masked_task_gets_no_gradient():
    x, y = _data(32)
    weights = {"digit": np.ones(32, "float32"), "parity": np.zeros(32, "float32")}
    for strategy in (None, SumOfGradients()):
        model = _model(strategy)
        before = [v.numpy().copy() for v in model.task_variables["parity"]]
        history = model.fit(x, y, sample_weight=weights, epochs=1, batch_size=32, verbose=0)
        assert history.history["parity_loss"] == [0.0]
        for b, v in zip(before, model.task_variables["parity"]):
            np.testing.assert_array_equal(b, v.numpy())


def test_masked_loss_is_mean_over_labelled_examples():
    x, y = _data(32)
    model = _model()
    mask = np.zeros(32, "float32")
    mask[:8] = 1.0
    full = model.evaluate(x[:8], {k: v[:8] for k, v in y.items()}, return_dict=True, verbose=0)
    masked = model.evaluate(
        x, y, sample_weight={"digit": mask, "parity": mask}, return_dict=True, verbose=0, batch_size=32
    )
    assert masked["digit_loss"] == pytest.approx(full["digit_loss"], rel=1e-5)


def test_compile_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"match no head: \['colour'\]"):
        model.compile(loss_weights={"colour": 1.0})
    with pytest.raises(ValueError, match="must be a dict keyed by head name"):
        model.compile(loss=["mse", "mse"])
    with pytest.raises(ValueError, match="Unknown weighting strategy 'pcgradd'"):
        model.compile(weighting="pcgradd")
    with pytest.raises(ValueError, match="must be >= 0"):
        model.compile(loss_weights={"digit": -1.0})
    with pytest.raises(ValueError, match="Unknown architecture 'star'"):
        kmtl.build_model(
            heads=[heads.Binary("p")], trunk=trunks.dense((4,)), input_shape=(3,), architecture="star"
        )
    with pytest.raises(ValueError, match="exactly one of `input_shape`"):
        kmtl.build_model(heads=[heads.Binary("p")], trunk=trunks.dense((4,)))


def test_target_errors_name_the_head():
    x, y = _data(32)
    model = _model()
    with pytest.raises(ValueError, match=r"Target key\(s\) \['value'\] match no head"):
        model.fit(x, {**y, "value": y["digit"]}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"Head\(s\) \['parity'\] have no target"):
        model.fit(x, {"digit": y["digit"]}, epochs=1, verbose=0)
    with pytest.raises(
        ValueError,
        match=r"Head 'digit': labels must be integers in \[0, 9\]. Received: labels with min=.*max=1[0-9]",
    ):
        model.fit(x, {"digit": y["digit"] + 7, "parity": y["parity"]}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"Head 'parity': labels must be values in \[0, 1\]"):
        model.fit(x, {"digit": y["digit"], "parity": y["parity"] * 3}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"Head 'digit' \(classification\) expects targets of shape"):
        model.fit(x, {"digit": np.eye(10)[y["digit"]], "parity": y["parity"]}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="Targets must be a dict keyed by head name"):
        model.fit(x, y["digit"], epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"Head 'digit': labels must be integers"):
        model.evaluate(x, {"digit": y["digit"] - 3, "parity": y["parity"]}, verbose=0)


def test_masked_labels_may_hold_placeholders():
    x, y = _data(32)
    model = _model()
    digit = y["digit"].copy()
    digit[:16] = -1  # missing labels, masked out
    mask = np.r_[np.zeros(16), np.ones(16)].astype("float32")
    model.fit(
        x,
        {"digit": digit, "parity": y["parity"]},
        sample_weight={"digit": mask, "parity": np.ones(32, "float32")},
        epochs=1,
        verbose=0,
    )


def test_metrics_skip_examples_whose_label_is_missing():
    # The objective replaces a missing label by a placeholder; the metrics must
    # not count it (they are Keras weighted metrics fed the masks).
    x, y = _data(48, seed=3)
    model = _model()
    mask = np.r_[np.ones(16), np.zeros(32)].astype("float32")
    parity = y["parity"].copy()
    parity[16:] = 1.0 - parity[16:]  # wrong labels, but masked
    report = model.evaluate(
        x,
        {"digit": y["digit"], "parity": parity},
        sample_weight={"digit": np.ones(48, "float32"), "parity": mask},
        return_dict=True,
        verbose=0,
    )
    predicted = (model.predict(x, verbose=0)["parity"].ravel() > 0.5).astype("float32")
    expected = float(np.mean(predicted[:16] == parity[:16]))
    assert report["parity_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert report["digit_accuracy"] == pytest.approx(
        float(np.mean(np.argmax(model.predict(x, verbose=0)["digit"], -1) == y["digit"])), abs=1e-6
    )


def test_epoch_losses_are_means_over_the_labelled_examples_whatever_the_batches_hold():
    # Unshuffled evaluation: the labelled parity examples all sit in the first
    # batch. The epoch's parity_loss must be their mean, not a mean of batch
    # means diluted by the batches that label nothing.
    x, y = _data(48, seed=4)
    model = _model(loss_weights={"parity": 0.5})
    mask = np.r_[np.ones(12), np.zeros(36)].astype("float32")
    weights = {"digit": np.ones(48, "float32"), "parity": mask}
    logs = model.evaluate(x, y, sample_weight=weights, batch_size=16, return_dict=True, verbose=0)
    out = model.predict(x, verbose=0)
    p = np.clip(out["parity"].ravel()[:12].astype("float64"), 1e-7, 1 - 1e-7)
    label = y["parity"][:12]
    parity = float(np.mean(-(label * np.log(p) + (1 - label) * np.log(1 - p))))
    assert logs["parity_loss"] == pytest.approx(parity, rel=1e-4)
    assert logs["loss"] == pytest.approx(logs["digit_loss"] + 0.5 * parity, rel=1e-4)
    whole = model.evaluate(x, y, sample_weight=weights, batch_size=48, return_dict=True, verbose=0)
    for key in ("parity_loss", "digit_loss", "loss"):
        assert logs[key] == pytest.approx(whole[key], rel=1e-4), key


@pytest.mark.parametrize("strategy", [None, "sum"])
def test_non_finite_loss_stops_with_task_name(strategy):
    x, y = _data(32, tasks=("digit", "value"))
    model = _model(SumOfGradients() if strategy else None, tasks=("digit", "value"))
    value = y["value"].copy()
    value[20] = np.nan
    with pytest.raises(kmtl.NonFiniteLossError, match="Task 'value' produced a non-finite loss"):
        model.fit(x, {"digit": y["digit"], "value": value}, epochs=1, batch_size=16, verbose=0, shuffle=False)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_keras_round_trip_keeps_config_compile_and_strategy(tmp_path):
    x, y = _data(32)
    model = kmtl.build_model(
        heads=[heads.Classification("digit", 10, hidden_units=(8,)), heads.Binary("parity")],
        trunk=trunks.conv((4,), (8,)),
        input_shape=(8, 8, 1),
        name="roundtrip",
    )
    model.compile(
        optimizer="adam", loss_weights={"digit": 1.0, "parity": 0.3}, weighting=SumOfGradients(update_every=2)
    )
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, kmtl.MultiTaskModel) and restored.name == "roundtrip"
    assert restored.get_config() == model.get_config()
    assert restored.heads == model.heads and restored.trunk == model.trunk
    assert isinstance(restored.weighting, SumOfGradients) and restored.weighting.update_every == 2
    for a, b in zip(model.predict(x, verbose=0).values(), restored.predict(x, verbose=0).values()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Training continues from the restored optimizer state.
    restored.fit(x, y, epochs=1, batch_size=16, verbose=0)
    json.dumps(restored.get_config())


def test_weighting_state_survives_keras_round_trip(tmp_path):
    @keras.saving.register_keras_serializable(package="kmtl_tests")
    class Counter(kmtl.weighting.Weighting):
        level = "loss"

        def build_state(self, num_tasks):
            self.calls = self.add_state("calls", ())

        def combine(self, losses, values, present, step, state):
            return ops.sum(losses), ops.ones_like(losses), {"calls": state["calls"] + 1.0}

    x, y = _data(32)
    model = _model(Counter())
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert float(model.weighting.calls.numpy()) == 4.0
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras")
    assert float(restored.weighting.calls.numpy()) == 4.0


def test_trainable_strategy_variables_are_optimized():
    @keras.saving.register_keras_serializable(package="kmtl_tests")
    class Learned(kmtl.weighting.Weighting):
        level = "loss"

        def build_state(self, num_tasks):
            self.scale = self.add_weight(shape=(num_tasks,), initializer="zeros", name="scale")

        def combine(self, losses, values, present, step, state):
            weight = ops.exp(-self.scale)
            return (
                ops.sum(weight * losses + self.scale),
                ops.stop_gradient(weight) * ops.ones_like(losses),
                {},
            )

    x, y = _data(32)
    model = _model(Learned())
    assert any(v is model.weighting.scale for v in model.trainable_variables)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.abs(model.weighting.scale.numpy()).max() > 0


def test_compile_model_for_plain_keras_models():
    inp = keras.Input((4,))
    hidden = keras.layers.Dense(8)(inp)
    outputs = {
        "a": keras.layers.Dense(3, activation="softmax", name="a")(hidden),
        "b": keras.layers.Dense(1, activation="sigmoid", name="b")(hidden),
    }
    model = keras.Model(inp, outputs)
    kmtl.compile_model(
        model, [heads.Classification("a", 3), heads.Binary("b")], loss_weights={"a": 2.0}, optimizer="adam"
    )
    logs = model.fit(np.zeros((8, 4)), {"a": np.zeros(8), "b": np.ones(8)}, verbose=0).history
    assert "a_accuracy" in logs and "b_auc" in logs
    with pytest.raises(ValueError, match=r"Head\(s\) \['c'\] match no model output"):
        kmtl.compile_model(model, [heads.Binary("c")])


def test_tf_dataset_with_masks_and_jit_off_and_on():
    x, y = _data(64)
    mask = {"digit": np.ones(64, "float32"), "parity": (np.arange(64) % 2).astype("float32")}
    ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(16)
    for jit in (False, True):
        model = _model(SumOfGradients(), jit_compile=jit)
        history = model.fit(ds, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
