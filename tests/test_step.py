"""The training step (kmtl.backend.tensorflow) and its guard: what a bad batch may and may not change.

- a non-finite batch under Adam leaves model weights, optimizer variables and
  iterations, and strategy state bit-identical, whatever produced it (a NaN
  target, a non-finite loss weight is refused before), for static weights and
  strategies of both families and both gradient engines;
- once a batch failed, the rest of the execution block changes nothing;
- the Jacobian and Gram engines give the same step;
- label checks run before the loss in fit and in evaluate, deterministically;
- loss weights: non-finite refused, NumPy scalars accepted.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import heads, trunks

TASKS = ("digit", "parity", "value")


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    digit = rng.integers(0, 10, n)
    x = 0.2 * rng.random((n, 8, 8, 1)).astype("float32")
    x[np.arange(n), digit // 8, digit % 8, 0] += 1.0
    y = {"digit": digit, "parity": (digit % 2).astype("float32"), "value": (digit / 9.0).astype("float32")}
    return x, y


def _model(weighting=None, optimizer="adam", trunk=None, **compile_kwargs):
    keras.utils.set_random_seed(1)
    model = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Binary("parity"), heads.Regression("value")],
        trunk=trunk or trunks.dense((16, 16)),
        input_shape=(8, 8, 1),
    )
    model.compile(optimizer=optimizer, weighting=weighting, **compile_kwargs)
    return model


def _snapshot(model):
    """Every variable a step may touch: model (incl. strategy state), optimizer (slots, iterations)."""
    values = {f"model/{v.path}": v.numpy().copy() for v in model.variables}
    values.update({f"optimizer/{v.path}": v.numpy().copy() for v in model.optimizer.variables})
    return values


def _assert_identical(before, after):
    assert before.keys() == after.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(value, after[path], err_msg=path)


CASES = [
    (None, {}),
    ("uncertainty", {}),
    ("famo", {}),
    ("gradnorm", {}),
    ("pcgrad", {"engine": "jacobian"}),
    ("pcgrad", {"engine": "gram"}),
    ("nash_mtl", {}),
    ("nash_mtl", {"mode": "representation"}),
    ("mgda", {"engine": "gram"}),
]


@pytest.mark.parametrize(
    "name,options", CASES, ids=[f"{n}-{'-'.join(o.values()) or 'default'}" for n, o in CASES]
)
def test_non_finite_batch_changes_nothing_under_adam(name, options):
    x, y = _data()
    model = _model(None if name is None else kmtl.weighting.get(name, **options))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # two good steps: Adam's moments are non-zero
    before = _snapshot(model)
    bad = dict(y)
    bad["value"] = y["value"].copy()
    bad["value"][5] = np.nan  # in the first batch
    with pytest.raises(kmtl.NonFiniteLossError, match="Task 'value' produced a non-finite loss") as info:
        model.fit(x, bad, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert info.value.task == "value"
    _assert_identical(before, _snapshot(model))
    assert int(model.optimizer.iterations.numpy()) == 2
    # The model trains on after a clean batch (the failure is forgotten at the next fit).
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4


def test_a_failed_batch_freezes_the_rest_of_its_execution_block():
    x, y = _data()
    model = _model("uncertainty", steps_per_execution=4)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = _snapshot(model)
    bad = dict(y)
    bad["value"] = y["value"].copy()
    bad["value"][20] = np.inf  # second batch of four, all run in one call
    with pytest.raises(kmtl.NonFiniteLossError, match="batch"):
        model.fit(x, bad, batch_size=16, epochs=1, verbose=0, shuffle=False)
    after = _snapshot(model)
    # Exactly the first step of the block was applied: iterations advanced by one.
    assert int(model.optimizer.iterations.numpy()) == 5
    changed = [p for p in before if not np.array_equal(before[p], after[p])]
    assert changed and all(p.startswith(("model/", "optimizer/")) for p in changed)
    # A fresh copy trained on that first batch alone reaches exactly the same state.
    reference = _model("uncertainty", steps_per_execution=4)
    reference.fit(x, y, batch_size=16, epochs=1, verbose=0)
    reference.fit(
        x[:16], {k: v[:16] for k, v in y.items()}, batch_size=16, epochs=1, verbose=0, shuffle=False
    )
    # Same variables in the same order (their paths differ by the objects' name counters).
    for a, b in zip(_snapshot(reference).values(), after.values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_finite_gradient_with_finite_losses_is_rejected_and_named():
    # sqrt has an infinite derivative at 0: the losses are finite, the gradient is not.
    @keras.saving.register_keras_serializable(package="kmtl_tests")
    def sqrt_error(y_true, y_pred):
        return tf.sqrt(tf.abs(tf.squeeze(y_pred, -1) - y_true) * 0.0)

    x, y = _data()
    model = _model("pcgrad", loss={"value": sqrt_error})
    model.optimizer.build(model.trainable_variables)
    before = _snapshot(model)
    with pytest.raises(kmtl.NonFiniteLossError, match="non-finite gradient") as info:
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert info.value.task == "value"
    _assert_identical(before, _snapshot(model))


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad", "imtl"])
def test_jacobian_and_gram_engines_take_the_same_step(name):
    x, y = _data()
    results = {}
    options = {"seed": 0} if name == "pcgrad" else {}  # the same random orders on both engines
    for engine in ("jacobian", "gram"):
        model = _model(
            kmtl.weighting.get(name, engine=engine, **options), optimizer=keras.optimizers.SGD(0.1)
        )
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
        results[engine] = model
    for a, b in zip(results["jacobian"].get_weights(), results["gram"].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_engine_choice_is_exposed_and_checked():
    from kmtl.backend.tensorflow.step import use_gram_engine

    hard = _model("pcgrad")
    assert not use_gram_engine(hard, hard.weighting)  # small model: the Jacobian is cheap
    gram = _model(kmtl.weighting.get("pcgrad", engine="gram"))
    assert use_gram_engine(gram, gram.weighting)
    with pytest.raises(ValueError, match="needs the full per-task gradients"):
        kmtl.weighting.get("graddrop", engine="gram")
    keras.utils.set_random_seed(0)
    mmoe = kmtl.build_model(
        heads=[heads.Binary("a"), heads.Binary("b")],
        trunk=trunks.dense((8,)),
        input_shape=(4,),
        architecture="mmoe",
    )
    mmoe.compile(weighting=kmtl.weighting.get("mgda", engine="gram"))
    with pytest.raises(ValueError, match="chain of stages"):
        mmoe.fit(np.zeros((4, 4), "float32"), {"a": np.zeros(4), "b": np.zeros(4)}, verbose=0)


@pytest.mark.parametrize("where", ["fit", "evaluate", "kmtl.evaluate"])
def test_label_check_runs_before_the_loss(where):
    # Out of range for the sparse cross-entropy kernel, which would raise its own error first.
    x, y = _data(32)
    bad = dict(y)
    bad["digit"] = y["digit"].copy()
    bad["digit"][3] = 16
    model = _model()
    for _ in range(3):  # deterministic, not a race
        with pytest.raises(
            kmtl.LabelError,
            match=r"Head 'digit': labels must be integers in \[0, 9\]\. Received: labels with min=0, max=16",
        ):
            if where == "fit":
                model.fit(x, bad, batch_size=32, verbose=0)
            elif where == "evaluate":
                model.evaluate(x, bad, batch_size=32, verbose=0)
            else:
                kmtl.evaluate(model, tf.data.Dataset.from_tensor_slices((x, bad)).batch(32))


def test_loss_weights_must_be_finite_and_may_be_numpy_scalars():
    model = _model()
    for value in (float("nan"), float("inf"), -1.0, "1", True):
        with pytest.raises(ValueError, match="Loss weight of head 'digit'"):
            model.compile(loss_weights={"digit": value})
    model.compile(loss_weights={"digit": np.float32(0.5), "parity": np.int64(2), "value": np.float64(0.1)})
    assert model.objective.static_weights == [0.5, 2.0, pytest.approx(0.1)]


def test_guard_reports_nothing_on_clean_training_and_resets_between_fits():
    x, y = _data()
    model = _model("dwa")
    guard = kmtl.TrainingGuard()
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[guard])
    assert model.objective.failure() is None
    model.objective.status.assign([1, 2])  # as left by a failed fit
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert model.objective.failure() is None


def test_same_batch_strategies_learn_from_the_batch_after_the_update():
    # FAMO(update="same_batch"): the step runs one more forward pass on the same
    # batch with the updated weights and commits after_step(values before, after).
    x, y = _data(32)
    model = _model(kmtl.weighting.FAMO(update="same_batch"), optimizer=keras.optimizers.SGD(0.1))
    strategy = model.weighting
    assert strategy.needs_losses_after_step

    def values():
        targets, weights = model.objective.prepare(y, None)
        return model.objective.task_losses(targets, model(x, training=True), weights).values

    before_values, state = values(), strategy.state()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    after_values = values()
    expected = strategy.after_step(
        before_values, after_values, tf.ones((3,), bool), tf.constant(0, tf.int64), state
    )
    np.testing.assert_allclose(strategy.logits.numpy(), expected["logits"].numpy(), rtol=1e-5, atol=1e-7)
    assert np.abs(strategy.logits.numpy()).max() > 0
