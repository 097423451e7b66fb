import numpy as np
import pytest
import tensorflow as tf
from _architecture_checks import (
    TRUNK,
    OnesFromGram,
    assert_gradient_level_equals_equal_weighting,
    assert_keras_round_trip,
    assert_partition,
    assert_saved_model_matches,
    images_and_labels,
)

import kmtl
from kmtl import heads, trunks

ROUTES = {"digit": "digit_image", "item": "item_image"}
SHAPES = {"digit_image": (28, 28, 1), "item_image": (28, 28, 1)}


def task_heads():
    return [heads.Classification("digit", num_classes=10), heads.Classification("item", num_classes=10)]


def build(**options):
    import keras

    keras.utils.set_random_seed(0)
    return kmtl.build_model(
        heads=task_heads(), trunk=TRUNK, inputs=SHAPES, architecture="task_routed", routes=ROUTES, **options
    )


@pytest.fixture(scope="module")
def arrays():
    return {
        "digit": images_and_labels("mnist", "train"),
        "item": images_and_labels("fashion-mnist", "train"),
        "digit_test": images_and_labels("mnist", "test", 1000),
        "item_test": images_and_labels("fashion-mnist", "test", 1000),
    }


def routed_stream(arrays, batch_size=64):
    """Mixed batches `({input: x}, {task: y}, {task: mask})` from kmtl.data.mix(routed=True)."""
    datasets = {
        task: tf.data.Dataset.from_tensor_slices((arrays[task][0], {task: arrays[task][1]})).shuffle(
            2000, seed=0
        )
        for task in ("digit", "item")
    }
    mixed = kmtl.data.mix(datasets, sampler="uniform", batch_size=batch_size, routed=True)
    # mix keys the inputs by task; this model's inputs are named by ROUTES.
    return mixed.map(lambda x, y, m: ({ROUTES[t]: v for t, v in x.items()}, y, m))


@pytest.fixture(scope="module")
def trained(arrays):
    model = build()
    model.compile(optimizer="adam")
    model.fit(routed_stream(arrays), epochs=2, verbose=0)
    return model


def test_trains_above_chance_on_each_task_from_its_own_input(trained, arrays):
    for task in ("digit", "item"):
        x, y = arrays[f"{task}_test"]
        sub = kmtl.architectures.task_submodel(trained, task)
        accuracy = np.mean(sub.predict({ROUTES[task]: x}, verbose=0)[task].argmax(-1) == y)
        assert accuracy > 0.6, (task, accuracy)  # chance: 0.1


def test_trunk_is_shared_heads_are_not(trained):
    assert_partition(trained)
    assert all(v.path.startswith("trunk") for v in trained.shared_variables)
    assert all(v.path.startswith("item_") for v in trained.task_variables["item"])
    assert not trained.supports_representation
    with pytest.raises(ValueError, match="no single shared representation"):
        build().compile(weighting=OnesFromGram(mode="representation"))


def test_task_submodel_takes_one_input_and_matches_the_model(trained, arrays):
    x = {"digit_image": arrays["digit_test"][0][:32], "item_image": arrays["item_test"][0][:32]}
    full = trained.predict(x, verbose=0)
    assert kmtl.architectures.task_inputs(trained) == {"digit": ["digit_image"], "item": ["item_image"]}
    for task in ("digit", "item"):
        sub = kmtl.architectures.task_submodel(trained, task)
        assert list(sub.input) == [ROUTES[task]]
        np.testing.assert_allclose(
            sub.predict({ROUTES[task]: x[ROUTES[task]]}, verbose=0)[task], full[task], atol=1e-6
        )


def test_round_trips_and_exports(trained, arrays, tmp_path):
    x = {"digit_image": arrays["digit_test"][0][:32], "item_image": arrays["item_test"][0][:32]}
    loaded = assert_keras_round_trip(trained, x, tmp_path)
    assert loaded.architecture_options == {"routes": ROUTES}
    assert_saved_model_matches(trained, x, tmp_path)
    # A client serves one task from its input alone.
    sub = kmtl.architectures.task_submodel(loaded, "item")
    sub.export(str(tmp_path / "item_only"), format="tf_saved_model", verbose=False)
    restored = tf.saved_model.load(str(tmp_path / "item_only"))
    served = restored.serve({"item_image": tf.constant(x["item_image"])})
    np.testing.assert_allclose(served["item"].numpy(), trained.predict(x, verbose=0)["item"], atol=1e-5)


def test_masked_gradient_level_step_equals_equal_weighting(arrays):
    x, y, mask = next(iter(routed_stream(arrays, batch_size=32)))
    assert 0 < float(tf.reduce_sum(mask["digit"])) < 32
    assert_gradient_level_equals_equal_weighting(build, x, y, sample_weight=mask)


def test_routes_let_two_heads_read_one_input():
    model = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Binary("parity")],
        inputs={"image": (8, 8, 1)},
        trunk=trunks.dense((8,)),
        architecture="task_routed",
        routes={"digit": "image", "parity": "image"},
    )
    assert sorted(model.encoder.output) == ["image"]
    assert kmtl.architectures.task_inputs(model) == {"digit": ["image"], "parity": ["image"]}


def test_default_routes_use_the_head_names():
    model = kmtl.build_model(
        heads=task_heads(),
        trunk=trunks.dense((8,)),
        inputs={"digit": (28, 28, 1), "item": (28, 28, 1)},
        architecture="task_routed",
    )
    assert kmtl.architectures.task_inputs(model) == {"digit": ["digit"], "item": ["item"]}


@pytest.mark.parametrize(
    "inputs, options, message",
    [
        ({"a": (28, 28, 1), "b": (28, 28, 1)}, {}, "do not match the head names"),
        (SHAPES, {"routes": {"digit": "digit_image"}}, "missing heads \\['item'\\]"),
        (SHAPES, {"routes": {"digit": "digit_image", "item": "nope"}}, "unknown inputs"),
        (SHAPES, {"routes": {"digit": "digit_image", "item": "digit_image"}}, "read by no head"),
        ({"digit_image": (28, 28, 1), "item_image": (32, 32, 1)}, {"routes": ROUTES}, "same shape"),
        (SHAPES, {"routes": ["digit_image", "item_image"]}, "must be a dict"),
    ],
)
def test_bad_routing_is_a_clear_error(inputs, options, message):
    with pytest.raises(ValueError, match=message) as info:
        kmtl.build_model(
            heads=task_heads(), trunk=trunks.dense((8,)), inputs=inputs, architecture="task_routed", **options
        )
    assert "Received" in str(info.value)


def test_single_input_is_refused():
    with pytest.raises(ValueError, match="inputs=\\{name: shape\\}"):
        kmtl.build_model(heads=task_heads(), input_shape=(28, 28, 1), architecture="task_routed")


def test_submodel_of_other_architecture_is_refused():
    model = kmtl.build_model(heads=task_heads(), trunk=trunks.dense((8,)), input_shape=(8,))
    with pytest.raises(ValueError, match="task_routed"):
        kmtl.architectures.task_submodel(model, "digit")
    with pytest.raises(ValueError, match="mmoe"):
        kmtl.architectures.expert_utilization(model, np.zeros((4, 8), "float32"))
