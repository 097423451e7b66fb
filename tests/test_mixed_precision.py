"""Mixed precision (`mixed_float16`, `mixed_bfloat16`) with every weighting strategy.

The global dtype policy is process-wide, so every case runs in one subprocess
(`SCRIPT`), which reports its measurements as JSON; the tests below check them.
The sweep (every registered strategy; the gradient-level ones in parameters
mode, representation mode and on the Gram engine) runs eagerly
(`run_eagerly=True`: the same step functions, without a trace per case); the
NaN case and the fit on digits run compiled, as users run them. The overflow
cases cover each kind of step and of state commit (loss level with trainable
state, FAMO's after-step update, the Jacobian, the representation without a
Gram matrix, the Gram engine).

Tolerances of the one-step comparison with float32 (same initial weights,
SGD; the error of the whole update relative to the size of the float32
update): float16 keeps 11 significant bits (unit roundoff 2**-11 ~ 4.9e-4),
bfloat16 8 (2**-8 ~ 3.9e-3); the forward and backward passes lose about one
roundoff here (measured: at most 2.8e-4 for float16, 6.6e-3 for bfloat16).
The bounds, 1e-2 and 5e-2, leave room for other CPUs' rounding; a strategy
fed the scaled gradients instead (scale 2**10) is far outside them (Nash-MTL:
0.20), as is a missing or doubled unscaling of the update (a factor 2**10).
"""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r'''
    import json
    import numpy as np
    import keras
    import tensorflow as tf
    import kmtl
    from kmtl import heads, trunks

    rng = np.random.default_rng(0)
    digit = rng.integers(0, 10, 16)
    x = rng.random((16, 8, 8, 1)).astype("float32")
    y = {"digit": digit, "parity": (digit % 2).astype("float32"), "value": (digit / 9).astype("float32")}
    LSO = keras.optimizers.LossScaleOptimizer

    def configs():
        for name in kmtl.weighting.names():
            strategy = kmtl.weighting.get(name)
            seed = {"seed": 0} if "seed" in strategy.get_config() else {}  # the same draws in every run
            if strategy.level == "loss":
                yield name, seed
                continue
            yield f"{name}/parameters", {"mode": "parameters", "engine": "jacobian", **seed}
            if strategy.supports_representation:
                yield f"{name}/representation", {"mode": "representation", **seed}
            if strategy.gram_based:
                yield f"{name}/gram", {"mode": "parameters", "engine": "gram", **seed}

    def values(variables):
        return [np.array(v.numpy()) for v in variables]

    MODELS = {}

    def build(policy, init=None):
        """One model per policy (a fresh build costs more than the step)."""
        if policy not in MODELS:
            keras.mixed_precision.set_global_policy(policy)
            keras.utils.set_random_seed(3)
            MODELS[policy] = kmtl.build_model(
                heads=[heads.Classification("digit", 10), heads.Binary("parity"), heads.Regression("value")],
                trunk=trunks.dense((16,)), input_shape=(8, 8, 1))
            MODELS[policy].network = list(MODELS[policy].weights)  # before any strategy joins
            MODELS[policy].initial = values(MODELS[policy].network)
        model = MODELS[policy]
        for variable, value in zip(model.network, model.initial if init is None else init, strict=True):
            variable.assign(value)
        return model

    def trained(model):
        """The network's trainable variables and the strategy's (uncertainty's log-variances)."""
        return [v for v in model.network if v.trainable] + list(model.weighting.trainable_variables)

    def same(a, b):
        return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))

    def flat(arrays):
        return np.concatenate([np.ravel(a).astype("float64") for a in arrays])

    def name_of(name):
        return name.split("/")[0]

    # Overflow cases: every kind of step and of state commit.
    # Overflow cases, every kind of step and of state commit, and a loss scale that
    # overflows float16 on the first step: 2**17 is 4x above the scale at which
    # this batch's gradients overflow; FAMO's gradients (of log-losses) are smaller.
    OVERFLOW = {"uncertainty": 2.0**17, "famo": 2.0**21, "pcgrad/parameters": 2.0**17,
                "graddrop/representation": 2.0**17, "gradnorm/gram": 2.0**17}
    NO_METRICS = {"digit": [], "parity": [], "value": []}  # the step is what is measured

    out = {"sweep": {}, "strategies": {}}
    for name in kmtl.weighting.names():
        strategy = kmtl.weighting.get(name)
        out["strategies"][name] = [strategy.level, strategy.gram_based, strategy.supports_representation]
    for label, options in configs():
        name = name_of(label)
        case = out["sweep"][label] = {}
        reference = build("float32")
        init = values(reference.network)
        reference.compile(optimizer=keras.optimizers.SGD(0.1),
                          weighting=kmtl.weighting.get(name, **options), metrics=NO_METRICS, run_eagerly=True)
        before = values(trained(reference))
        reference.train_on_batch(x, y)
        delta32 = flat(values(trained(reference))) - flat(before)
        for policy in ("mixed_float16", "mixed_bfloat16"):
            model = build(policy, init)
            optimizer = keras.optimizers.SGD(0.1)
            if policy == "mixed_float16":
                # 2**15 (Keras's default) overflows on this first step; 2**10 still scales.
                optimizer = LSO(optimizer, initial_scale=2.0**10)
            model.compile(optimizer=optimizer, weighting=kmtl.weighting.get(name, **options),
                          metrics=NO_METRICS, run_eagerly=True)
            outputs = model(x[:2], training=False)
            model.train_on_batch(x, y)
            delta = flat(values(trained(model))) - flat(before)
            case[policy] = {
                "relative_error": float(np.linalg.norm(delta - delta32) / np.linalg.norm(delta32)),
                "output_dtypes": sorted({keras.backend.standardize_dtype(v.dtype) for v in outputs.values()}),
                "strategy_dtypes": sorted({str(v.dtype) for v in model.weighting.variables
                                           if "float" in str(v.dtype)}),
                "iterations": int(model.optimizer.iterations.numpy()),
                "failure": model.objective.failure(),
            }
        if label not in OVERFLOW:
            continue
        model = build("mixed_float16", init)
        inner = keras.optimizers.Adam(0.01)
        optimizer = LSO(inner, initial_scale=OVERFLOW[label])
        model.compile(optimizer=optimizer, weighting=kmtl.weighting.get(name, **options),
                      metrics=NO_METRICS, run_eagerly=True)
        optimizer.build(model.trainable_variables)
        weights, slots, state = (values(model.network), values(inner.variables),
                                 values(model.weighting.variables))
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # the guard would raise on a failure
        overflow = case["overflow"] = {
            "weights_same": same(weights, values(model.network)),
            "slots_same": same(slots, values(inner.variables)),
            "state_same": same(state, values(model.weighting.variables)),
            "iterations": int(inner.iterations.numpy()),
            "scale": float(optimizer.dynamic_scale.numpy()) / OVERFLOW[label],
            "failure": model.objective.failure(),
        }
        # Training goes on: the scale comes down until the gradients fit, then updates apply.
        skipped = 1
        while inner.iterations.numpy() == 0 and skipped < 10:
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
            skipped += int(inner.iterations.numpy() == 0)
        losses = [model.fit(x, y, batch_size=16, epochs=1, verbose=0).history["loss"][0] for _ in range(2)]
        overflow["after"] = {
            "skipped": skipped,
            "iterations": int(inner.iterations.numpy()),
            "scale": float(optimizer.dynamic_scale.numpy()) / OVERFLOW[label],
            "state_changed": not same(state, values(model.weighting.variables)),
            "losses": losses,
            "failure": model.objective.failure(),
        }

    # NaN data: the clear failure of today, under mixed_float16, compiled.
    out["nan"] = {}
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    for label, options, eager in [("equal", {}, False),
                                  ("pcgrad/parameters", {"mode": "parameters", "engine": "jacobian"}, True),
                                  ("nash_mtl/gram", {"engine": "gram"}, True)]:
        model = build("mixed_float16")
        model.compile(optimizer="sgd", weighting=kmtl.weighting.get(name_of(label), **options),
                      run_eagerly=eager)
        model.optimizer.build(model.trainable_variables)
        weights = values(model.network)
        scale = float(model.optimizer.dynamic_scale.numpy())
        try:
            model.fit(bad, y, batch_size=16, epochs=1, verbose=0)
            raised = None
        except Exception as error:
            raised = type(error).__name__
        out["nan"][label] = {
            "raised": raised,
            "weights_same": same(weights, values(model.network)),
            "scale_same": float(model.optimizer.dynamic_scale.numpy()) == scale,
            "optimizer": type(model.optimizer).__name__,  # compile wrapped "sgd"
            "iterations": int(model.optimizer.iterations.numpy()),
        }

    # Gradients too large for float16 even unscaled: skipped while the scale is
    # above 1, then the clear failure (a lower scale would only hide them).
    model = build("mixed_float16")
    model.compile(optimizer=LSO(keras.optimizers.SGD(0.1), initial_scale=2.0),
                  loss_weights={"digit": 1e7, "parity": 1.0, "value": 1.0}, weighting="pcgrad",
                  run_eagerly=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    first = {"scale": float(model.optimizer.dynamic_scale.numpy()), "failure": model.objective.failure()}
    try:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        raised = None
    except Exception as error:
        raised = type(error).__name__
    out["floor"] = {"first": first, "raised": raised, "iterations": int(model.optimizer.iterations.numpy())}

    # Every architecture's heads output float32 under both mixed policies.
    out["architectures"] = {}
    esmm_heads = lambda: [heads.Binary("watched"), heads.Binary("liked_given_watched"),
                          heads.Binary("watched_and_liked")]
    for policy in ("mixed_float16", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        for architecture in kmtl.architectures.names():
            if architecture == "task_routed":
                model = kmtl.build_model(heads=[heads.Classification("digit", 10), heads.Regression("value")],
                                         trunk=trunks.dense((8,)), inputs={"digit": (6,), "value": (6,)},
                                         architecture=architecture)
                outputs = model({"digit": np.zeros((2, 6), "float32"), "value": np.zeros((2, 6), "float32")})
            elif architecture == "esmm":
                model = kmtl.build_model(heads=esmm_heads(), trunk=trunks.dense((8,)), input_shape=(6,),
                                         architecture="esmm")
                outputs = model(np.zeros((2, 6), "float32"))
            else:
                model = kmtl.build_model(heads=[heads.Classification("digit", 10), heads.Regression("value")],
                                         trunk=trunks.conv((4,), (8,)), input_shape=(8, 8, 1),
                                         architecture=architecture)
                outputs = model(x[:2])
            dtypes = {keras.backend.standardize_dtype(v.dtype) for v in outputs.values()}
            out["architectures"][f"{policy}/{architecture}"] = sorted(dtypes)

    # A short compiled fit on scikit-learn's digits under mixed_float16.
    out["digits"] = {}
    tasks = ["digit", "parity"]
    train = kmtl.data.digits_tasks(tasks, batch_size=64)
    for label, name, options, optimizer in [
        ("pcgrad, initial scale 2**24", "pcgrad", {},
         lambda: LSO(keras.optimizers.Adam(0.01), initial_scale=2.0**24)),
    ]:
        keras.mixed_precision.set_global_policy("mixed_float16")
        keras.utils.set_random_seed(0)
        model = kmtl.build_model(input_shape=kmtl.data.input_shape("digits"), trunk=trunks.dense((32,)),
                                 heads=kmtl.data.task_heads("digits", tasks))
        model.compile(optimizer=optimizer(), weighting=kmtl.weighting.get(name, **options))
        start = model.evaluate(train, verbose=0, return_dict=True)["loss"]
        history = model.fit(train, epochs=2, verbose=0)
        out["digits"][label] = {
            "optimizer": type(model.optimizer).__name__,
            "start": start,
            "end": model.evaluate(train, verbose=0, return_dict=True)["loss"],
            "history": history.history["loss"],
            "iterations": int(model.optimizer.iterations.numpy()),
            "steps": 2 * int(train.cardinality().numpy()),
            "scale": float(model.optimizer.dynamic_scale.numpy()),
        }
    print("RESULT " + json.dumps(out))
    '''
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, check=False
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_the_sweep_covers_every_strategy_and_both_gradient_modes_and_the_gram_engine(results):
    labels = set(results["sweep"])
    assert len(results["strategies"]) >= 17
    for name, (level, gram_based, supports_representation) in results["strategies"].items():
        if level == "loss":
            assert name in labels
        else:
            assert f"{name}/parameters" in labels
            assert (f"{name}/representation" in labels) == supports_representation
            assert (f"{name}/gram" in labels) == gram_based


@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 1e-2), ("mixed_bfloat16", 5e-2)])
def test_one_mixed_step_is_close_to_the_float32_step(results, policy, tolerance):
    errors = {label: case[policy]["relative_error"] for label, case in results["sweep"].items()}
    assert all(case[policy]["iterations"] == 1 for case in results["sweep"].values()), errors
    assert all(case[policy]["failure"] is None for case in results["sweep"].values())
    far = {label: error for label, error in errors.items() if not error <= tolerance}
    assert not far, f"{policy}: relative error of the update above {tolerance}: {far}"


def test_heads_output_float32_and_strategy_state_is_float32(results):
    for label, case in results["sweep"].items():
        for policy in ("mixed_float16", "mixed_bfloat16"):
            assert case[policy]["output_dtypes"] == ["float32"], (label, policy)
            assert case[policy]["strategy_dtypes"] == ["float32"], (label, policy)
    assert results["architectures"] and all(d == ["float32"] for d in results["architectures"].values()), (
        results["architectures"]
    )


def test_a_float16_overflow_is_a_skipped_step_then_training_goes_on(results):
    cases = {label: case["overflow"] for label, case in results["sweep"].items() if "overflow" in case}
    assert set(cases) == {
        "uncertainty",
        "famo",
        "pcgrad/parameters",
        "graddrop/representation",
        "gradnorm/gram",
    }
    for label, overflow in cases.items():
        assert overflow["failure"] is None, label
        assert overflow["weights_same"] and overflow["slots_same"] and overflow["state_same"], (
            label,
            overflow,
        )
        assert overflow["iterations"] == 0 and overflow["scale"] == 0.5, (label, overflow)
        after = overflow["after"]
        assert after["failure"] is None and after["state_changed"], (label, after)
        # Each skipped step halved the scale; then three updates (the last two recorded losses).
        assert after["scale"] == 0.5 ** after["skipped"] and after["iterations"] == 3, (label, after)
        assert after["losses"][1] < after["losses"][0], (label, after)


def test_nan_data_is_still_a_failure_that_changes_nothing(results):
    assert set(results["nan"]) == {"equal", "pcgrad/parameters", "nash_mtl/gram"}
    for label, case in results["nan"].items():
        assert case["raised"] == "NonFiniteLossError", (label, case)
        assert case["weights_same"] and case["scale_same"] and case["iterations"] == 0, (label, case)
        assert case["optimizer"] == "LossScaleOptimizer", label


def test_gradients_beyond_float16_fail_once_the_scale_reaches_1(results):
    floor = results["floor"]
    assert floor["first"] == {"scale": 1.0, "failure": None}
    assert floor["raised"] == "NonFiniteLossError" and floor["iterations"] == 0


def test_short_fits_on_digits_learn_under_mixed_float16(results):
    for label, run in results["digits"].items():
        assert run["optimizer"] == "LossScaleOptimizer", label
        assert run["end"] < 0.5 * run["start"] and run["history"][1] < run["history"][0], (label, run)
        # Some steps overflowed and were skipped, each halving the scale (doubled after 2000 good ones).
        skipped = run["steps"] - run["iterations"]
        assert skipped > 0 and run["scale"] == 2.0 ** (24 - skipped), (label, run)
