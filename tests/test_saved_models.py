"""Saved in one process, loaded in another: every strategy, every architecture.

One subprocess trains every registered strategy (each paired with an
architecture, round robin, so that every architecture is covered by several
strategies of both families) for a few steps and saves each model as
`.keras`, with its predictions and strategy state. A second, fresh
subprocess imports only `kmtl` and, for every file: loads it with plain
`keras.saving.load_model` and with `kmtl.export.load_keras`, checks the
predictions, the strategy state and the optimizer's restored iterations,
evaluates, and exports a SavedModel that it serves through
`tf.saved_model.load`. Importing TensorFlow costs seconds, so each process
handles every model.
"""

import json
import subprocess
import sys
import textwrap

import kmtl

ARCHITECTURES = kmtl.architectures.names()
STRATEGIES = kmtl.weighting.names()
# Round robin: strategy i with architecture i mod 9 (17 strategies -> every architecture 1-2 times).
PAIRS = [(s, ARCHITECTURES[i % len(ARCHITECTURES)]) for i, s in enumerate(STRATEGIES)]

COMMON = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    import keras
    import kmtl
    from kmtl import heads, trunks

    def data(architecture, n=24):
        rng = np.random.default_rng(0)
        digit = rng.integers(0, 10, n)
        x = rng.random((n, 8, 8, 1)).astype("float32")
        y = {"digit": digit, "parity": (digit % 2).astype("float32")}
        if architecture == "task_routed":
            x = {"digit": x, "parity": 1.0 - x}
        if architecture == "esmm":  # its three probability heads
            watched = (digit > 4).astype("float32")
            y = {"watched": watched, "liked_given_watched": y["parity"], "watched_and_liked": watched * y["parity"]}
        return x, y

    def task_heads(architecture):
        if architecture == "esmm":
            return [heads.Binary(n) for n in ("watched", "liked_given_watched", "watched_and_liked")]
        return [heads.Classification("digit", 10), heads.Binary("parity")]

    # The second trained task weighs 0.5 (ESMM trains watched and watched_and_liked).
    SECOND = {"esmm": "watched_and_liked"}

    # The pair's model (conv trunk) and strategy, in parameter mode where the
    # architecture has no shared representation (e.g. GradDrop on CGC).
    def model_and_weighting(strategy, architecture):
        spec = dict(heads=task_heads(architecture), trunk=trunks.conv((4,), (8,)), architecture=architecture)
        if architecture == "task_routed":
            model = kmtl.build_model(inputs={"digit": (8, 8, 1), "parity": (8, 8, 1)}, **spec)
        else:
            model = kmtl.build_model(input_shape=(8, 8, 1), **spec)
        weighting = kmtl.weighting.get(strategy)
        if weighting.level == "gradient" and weighting.mode == "representation" and not model.supports_representation:
            weighting = kmtl.weighting.get(strategy, mode="parameters")
        return model, weighting
    """
)

TRAIN = COMMON + textwrap.dedent(
    r"""
    out, pairs = sys.argv[1], json.loads(sys.argv[2])
    for strategy, architecture in pairs:
        keras.utils.set_random_seed(0)
        x, y = data(architecture)
        model, weighting = model_and_weighting(strategy, architecture)
        model.compile(optimizer="adam", loss_weights={SECOND.get(architecture, "parity"): 0.5}, weighting=weighting)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        name = f"{strategy}-{architecture}"
        model.save(f"{out}/{name}.keras")
        prediction = {k: v.numpy() for k, v in model(x, training=False).items()}  # eager: no trace to pay
        state = {f"state_{i}": w for i, w in enumerate(model.weighting.get_weights())}
        np.savez(f"{out}/{name}.npz", **{f"pred_{k}": v for k, v in prediction.items()}, **state)
        print("saved", name, flush=True)
    print("TRAINED")
    """
)

LOAD = COMMON + textwrap.dedent(
    r"""
    import tensorflow as tf
    out, pairs = sys.argv[1], json.loads(sys.argv[2])
    for strategy, architecture in pairs:
        name = f"{strategy}-{architecture}"
        x, y = data(architecture)
        saved = np.load(f"{out}/{name}.npz")
        # Plain Keras finds every kmtl class once kmtl is imported.
        plain = keras.saving.load_model(f"{out}/{name}.keras")
        assert isinstance(plain, kmtl.MultiTaskModel), name
        for i, w in enumerate(plain.weighting.get_weights()):
            np.testing.assert_array_equal(w, saved[f"state_{i}"], err_msg=f"{name} state {i} (plain Keras load)")
        model = kmtl.export.load_keras(f"{out}/{name}.keras")
        assert isinstance(model, kmtl.MultiTaskModel), name
        assert type(model.weighting).__name__ == type(kmtl.weighting.get(strategy)).__name__, name
        assert model.objective.static_weights == [1.0, 0.5], name
        assert int(model.optimizer.iterations.numpy()) == 6, name  # 2 epochs x 3 batches: optimizer state is back
        prediction = {k: v.numpy() for k, v in model(x, training=False).items()}
        for key, value in prediction.items():
            np.testing.assert_allclose(value, saved[f"pred_{key}"], rtol=1e-5, atol=1e-6, err_msg=name)
        for i, w in enumerate(model.weighting.get_weights()):
            np.testing.assert_array_equal(w, saved[f"state_{i}"], err_msg=f"{name} state {i}")
        report = kmtl.evaluate(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(24))
        assert set(report) == set(y), name
        served = kmtl.export.saved_model(model, f"{out}/{name}-served")
        signature = tf.saved_model.load(str(served)).signatures["serving_default"]
        inputs = {k: tf.constant(v) for k, v in x.items()} if isinstance(x, dict) else {"image": tf.constant(x)}
        result = signature(**inputs)
        for key in y:
            np.testing.assert_allclose(result[key].numpy(), prediction[key], rtol=1e-5, atol=1e-6, err_msg=name)
        print("loaded", name, flush=True)
    print("LOADED")
    """
)


def _run(script, tmp_path, timeout=900):
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(PAIRS)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result


def test_every_strategy_and_architecture_loads_in_a_new_process(tmp_path):
    assert {a for _, a in PAIRS} == set(ARCHITECTURES) and len(PAIRS) == len(STRATEGIES)
    trained = _run(TRAIN, tmp_path)
    assert trained.returncode == 0 and "TRAINED" in trained.stdout, trained.stdout + trained.stderr[-3000:]
    loaded = _run(LOAD, tmp_path)
    assert loaded.returncode == 0 and "LOADED" in loaded.stdout, loaded.stdout + loaded.stderr[-3000:]
