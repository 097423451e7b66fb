"""Hard sharing with `shared_depth`: which trunk blocks the tasks share."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from _architecture_checks import (
    TRUNK,
    OnesFromGram,
    accuracies,
    assert_gradient_level_equals_equal_weighting,
    build,
    digit_parity,
    train,
)

import kmtl
from kmtl.backend.tensorflow import gram
from kmtl.backend.tensorflow.step import use_gram_engine

NUM_BLOCKS = TRUNK.num_blocks  # conv 4, conv 8, dense 16: three blocks of a kernel and a bias each

#: The variables of the default model (`shared_depth=None`) as the builder made them
#: before the option existed: saved models of that time load into the same graph.
TODAY = [
    ("trunk_block_0/trunk_conv_0/kernel", (3, 3, 1, 4)),
    ("trunk_block_0/trunk_conv_0/bias", (4,)),
    ("trunk_block_1/trunk_conv_1/kernel", (3, 3, 4, 8)),
    ("trunk_block_1/trunk_conv_1/bias", (8,)),
    ("trunk_dense_block_0/trunk_dense_0/kernel", (392, 16)),
    ("trunk_dense_block_0/trunk_dense_0/bias", (16,)),
    ("digit_output/kernel", (16, 10)),
    ("digit_output/bias", (10,)),
    ("parity_output/kernel", (16, 1)),
    ("parity_output/bias", (1,)),
]


def _variables(model):
    return [(w.path, tuple(w.shape)) for w in model.weights]


def test_num_blocks_counts_conv_then_dense_blocks():
    assert NUM_BLOCKS == 3 == len(TRUNK.stages())
    assert kmtl.trunks.dense((8, 4)).num_blocks == 2
    assert kmtl.trunks.lenet().num_blocks == 3


def test_options_show_shared_depth():
    assert kmtl.architectures.options("hard_sharing") == {"shared_depth": None}


@pytest.mark.parametrize("depth", range(NUM_BLOCKS + 1))
def test_shared_depth_partitions_the_trunk(depth):
    model = build("hard_sharing", shared_depth=depth)
    shared = [v.path for v in model.shared_variables]
    assert len(shared) == 2 * depth
    assert all(p.startswith("trunk_") for p in shared), shared
    owned = [id(v) for v in model.shared_variables]
    for task, variables in model.task_variables.items():
        trunk_copy = [v.path for v in variables if v.path.startswith(f"{task}_trunk_")]
        assert len(trunk_copy) == 2 * (NUM_BLOCKS - depth), trunk_copy
        # The copies are blocks depth, depth+1, ... of the trunk (named by their index).
        blocks = sorted({p.split("/")[0] for p in trunk_copy})
        expected = [f"{task}_trunk_block_{i}" for i in range(depth, 2)]
        expected += [f"{task}_trunk_dense_block_0"] if depth < NUM_BLOCKS else []
        assert blocks == sorted(expected)
        assert all(p.startswith(f"{task}_") for p in (v.path for v in variables))
        owned += [id(v) for v in variables]
    assert len(owned) == len(set(owned)), "a variable belongs to two parts"
    assert set(owned) == {id(v) for v in model.trainable_variables}
    stages = model.encoder_stages
    assert (len(stages) if stages else 0) == depth
    assert gram.applicable(model) == (depth > 0)
    x = np.zeros((2, 28, 28, 1), "float32")
    assert {k: v.shape for k, v in model.predict(x, verbose=0).items()} == {
        "digit": (2, 10),
        "parity": (2, 1),
    }


def test_default_is_todays_graph_and_equals_full_depth():
    default = build("hard_sharing")
    full = build("hard_sharing", shared_depth=NUM_BLOCKS)
    assert _variables(default) == _variables(full) == TODAY
    assert [layer.name for layer in default.encoder.layers] == [layer.name for layer in full.encoder.layers]
    assert default.architecture_options == {}
    assert full.architecture_options == {"shared_depth": NUM_BLOCKS}
    assert default.shared_description == full.shared_description == "all trunk variables"


@pytest.mark.parametrize("value", [-1, NUM_BLOCKS + 1, 1.0, "1", True])
def test_bad_shared_depth(value):
    with pytest.raises(ValueError, match=r"\[0, 3\]") as info:
        build("hard_sharing", shared_depth=value)
    assert str(info.value).endswith(f"Received: shared_depth={value!r}")


def _random_batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 28, 28, 1)).astype("float32")
    digit = rng.integers(0, 10, n)
    return x, {"digit": digit, "parity": (digit % 2).astype("float32")}


def test_gradient_level_on_the_shared_blocks_equals_equal_weighting():
    x, y = _random_batch()
    assert_gradient_level_equals_equal_weighting(lambda: build("hard_sharing", shared_depth=2), x, y)
    assert_gradient_level_equals_equal_weighting(
        lambda: build("hard_sharing", shared_depth=1), x, y, mode="representation"
    )
    # The Gram engine walks the shared blocks only.
    reference, candidate = build("hard_sharing", shared_depth=2), build("hard_sharing", shared_depth=2)
    candidate.set_weights(reference.get_weights())
    reference.compile(optimizer=keras.optimizers.SGD(0.5))
    candidate.compile(optimizer=keras.optimizers.SGD(0.5), weighting=OnesFromGram(engine="gram"))
    assert use_gram_engine(candidate, candidate.weighting)
    reference.train_on_batch(x, y)
    candidate.train_on_batch(x, y)
    for r, c in zip(reference.trainable_weights, candidate.trainable_weights, strict=True):
        np.testing.assert_allclose(c.numpy(), r.numpy(), atol=2e-5, rtol=1e-4, err_msg=r.path)


def test_nothing_shared_trains_with_loss_and_representation_level_weighting():
    """`shared_depth=0`: no shared variable. Parameter mode has nothing to combine: a clear error at compile."""
    x, y = _random_batch()
    for weighting in (None, kmtl.weighting.get("mgda", mode="representation")):
        model = build("hard_sharing", shared_depth=0)
        assert model.shared_variables == [] and model.supports_representation
        model.compile(optimizer="adam", weighting=weighting)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
        assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0], weighting
    model = build("hard_sharing", shared_depth=0)
    with pytest.raises(
        ValueError, match=r"has none \(e.g. hard_sharing with shared_depth=0\).*Received: PCGrad"
    ):
        model.compile(optimizer="adam", weighting=kmtl.weighting.get("pcgrad", mode="parameters"))


LOAD = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    import keras
    import kmtl

    out, cases = sys.argv[1], json.loads(sys.argv[2])
    x = np.load(f"{out}/x.npy")
    for name, options in cases.items():
        model = keras.saving.load_model(f"{out}/{name}.keras")
        assert isinstance(model, kmtl.MultiTaskModel), name
        assert model.architecture_options == options, (name, model.architecture_options)
        saved = np.load(f"{out}/{name}.npz")
        prediction = model.predict(x, verbose=0)
        for key, value in prediction.items():
            np.testing.assert_allclose(value, saved[f"pred_{key}"], rtol=1e-5, atol=1e-6, err_msg=name)
        assert json.loads(str(saved["shared"])) == [v.path for v in model.shared_variables], name
        history = model.fit(x, {k: saved[f"label_{k}"] for k in prediction}, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"]).all(), name
        print("loaded", name, flush=True)
    print("LOADED")
    """
)


def test_keras_round_trip_in_a_fresh_process(tmp_path):
    x, y = _random_batch(16, seed=1)
    np.save(tmp_path / "x.npy", x)
    cases = {"depth_1": {"shared_depth": 1}, "depth_0": {"shared_depth": 0}, "default": {}}
    for name, options in cases.items():
        model = build("hard_sharing", **options)
        model.compile(optimizer="adam")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        model.save(tmp_path / f"{name}.keras")
        shared = json.dumps([v.path for v in model.shared_variables])
        prediction = {f"pred_{k}": v for k, v in model.predict(x, verbose=0).items()}
        np.savez(
            tmp_path / f"{name}.npz", shared=shared, **{f"label_{k}": v for k, v in y.items()}, **prediction
        )
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "LOADED" in result.stdout, result.stdout + result.stderr[-3000:]


def test_learns_mnist_digit_and_parity_with_one_shared_block(mnist_dir):
    model = train(build("hard_sharing", shared_depth=1), digit_parity("train"))
    scores = accuracies(model, *digit_parity("test", 1000))
    assert scores["digit"] > 0.6, scores  # chance: 0.1
    assert scores["parity"] > 0.7, scores  # chance: 0.5
