import numpy as np
import pytest
from _architecture_checks import (
    TRUNK,
    accuracies,
    assert_gradient_level_equals_equal_weighting,
    assert_keras_round_trip,
    assert_partition,
    assert_saved_model_matches,
    build,
    digit_parity,
    task_heads,
    train,
)

import kmtl
from kmtl import trunks


@pytest.fixture(scope="module")
def data():
    return digit_parity("train"), digit_parity("test", 1000)


@pytest.fixture(scope="module")
def trained(data):
    return train(build("mmoe", num_experts=3), data[0])


def test_trains_above_chance_on_every_task(trained, data):
    scores = accuracies(trained, *data[1])
    assert scores["digit"] > 0.6, scores  # chance: 0.1
    assert scores["parity"] > 0.7, scores  # chance: 0.5


def test_shared_variables_are_the_experts(trained):
    assert_partition(trained)
    shared_names = {v.path for v in trained.shared_variables}
    assert all(p.startswith("expert_") for p in shared_names), shared_names
    digit = {v.path for v in trained.task_variables["digit"]}
    assert any("digit_gate" in p for p in digit) and not any("expert" in p for p in digit)
    assert not trained.supports_representation


def test_stem_gates_share_the_stem_and_support_representation():
    model = build("mmoe", num_experts=2, gate_input="stem")
    assert_partition(model)
    assert model.supports_representation
    assert any(v.path.startswith("stem_") for v in model.shared_variables)
    assert model.encoder.output["gate_input"].shape[1:] == (14, 14, 4)


def test_keras_round_trip_and_saved_model(trained, data, tmp_path):
    x = data[1][0][:64]
    loaded = assert_keras_round_trip(trained, x, tmp_path)
    assert loaded.architecture_options == {"num_experts": 3}
    assert_saved_model_matches(trained, {"image": x}, tmp_path)


def test_expert_utilization_is_a_distribution_per_task(trained, data):
    usage = kmtl.architectures.expert_utilization(trained, data[1][0], steps=2)
    assert sorted(usage) == ["digit", "parity"]
    for weights in usage.values():
        assert weights.shape == (3,)
        np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-5)
    assert kmtl.architectures.expert_labels(trained)["digit"] == ["expert_0", "expert_1", "expert_2"]


@pytest.mark.parametrize("gate_input, mode", [("input", "parameters"), ("stem", "representation")])
def test_gradient_level_strategy_equals_equal_weighting(data, gate_input, mode):
    x, y = data[0]
    batch = x[:32], {k: v[:32] for k, v in y.items()}
    assert_gradient_level_equals_equal_weighting(
        lambda: build("mmoe", num_experts=2, gate_input=gate_input), *batch, mode=mode
    )


def test_representation_mode_is_refused_for_input_gates():
    from _architecture_checks import OnesFromGram

    model = build("mmoe", num_experts=2)
    with pytest.raises(ValueError, match="no single shared representation"):
        model.compile(weighting=OnesFromGram(mode="representation"))


def test_dense_trunk_experts():
    model = kmtl.build_model(
        heads=task_heads(), trunk=trunks.dense((16,)), input_shape=(28, 28, 1), architecture="mmoe"
    )
    assert model.encoder.output["expert_3"].shape[1:] == (16,)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 2.5}, "num_experts"),
        ({"gate_input": "hidden"}, "gate_input"),
        ({"num_expert": 3}, "Valid options: num_experts, gate_input"),
        ({"num_experts": np.int64(2)}, "plain JSON"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message) as info:
        build("mmoe", **options)
    assert "Received" in str(info.value)


def test_stem_needs_two_trunk_stages():
    with pytest.raises(ValueError, match="at least one more stage"):
        kmtl.build_model(
            heads=task_heads(),
            trunk=trunks.dense((16,)),
            input_shape=(28, 28, 1),
            architecture="mmoe",
            gate_input="stem",
        )


def test_conv_trunk_needs_images():
    with pytest.raises(ValueError, match="image inputs"):
        kmtl.build_model(heads=task_heads(), trunk=TRUNK, input_shape=(784,), architecture="mmoe")
