import numpy as np
import pytest
from _architecture_checks import (
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
def trained_ple(data):
    return train(build("ple", num_levels=2, num_shared_experts=2, num_task_experts=1), data[0])


def test_ple_trains_above_chance_on_every_task(trained_ple, data):
    scores = accuracies(trained_ple, *data[1])
    assert scores["digit"] > 0.6, scores  # chance: 0.1
    assert scores["parity"] > 0.7, scores  # chance: 0.5


def test_ple_split_inner_levels_shared_last_task_experts_specific(trained_ple):
    assert_partition(trained_ple)
    shared = {v.path for v in trained_ple.shared_variables}
    # Inner level: task experts and gates feed the shared gate, so they are shared.
    assert any(p.startswith("level_0_digit_expert") for p in shared)
    assert any(p.startswith("level_0_shared_gate") for p in shared)
    assert any(p.startswith("level_1_shared_expert") for p in shared)
    digit = {v.path for v in trained_ple.task_variables["digit"]}
    assert any(p.startswith("level_1_digit_expert") for p in digit)
    assert any(p.startswith("digit_gate") for p in digit)
    assert not any("parity" in p for p in digit)
    assert trained_ple.supports_representation


def test_ple_round_trips_and_exports(trained_ple, data, tmp_path):
    x = data[1][0][:64]
    assert_keras_round_trip(trained_ple, x, tmp_path)
    assert_saved_model_matches(trained_ple, {"image": x}, tmp_path)


def test_ple_expert_utilization(trained_ple, data):
    usage = kmtl.architectures.expert_utilization(trained_ple, data[1][0], steps=1)
    labels = kmtl.architectures.expert_labels(trained_ple)
    assert labels["parity"] == ["shared_0", "shared_1", "parity_0"]
    for weights in usage.values():
        assert weights.shape == (3,)
        np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-5)


def test_ple_representation_mode_equals_equal_weighting(data):
    x, y = data[0]
    assert_gradient_level_equals_equal_weighting(
        lambda: build("ple", num_levels=2), x[:32], {k: v[:32] for k, v in y.items()}, mode="representation"
    )


def test_cgc_trains_exports_and_has_task_experts_in_decoders(data, tmp_path):
    model = train(build("cgc", num_shared_experts=1, num_task_experts=2), data[0])
    scores = accuracies(model, *data[1])
    assert scores["digit"] > 0.6 and scores["parity"] > 0.7, scores
    assert_partition(model)
    shared = {v.path for v in model.shared_variables}
    assert all(p.startswith("level_0_shared_expert") for p in shared), shared
    assert not model.supports_representation  # the representation holds the raw input
    assert len(kmtl.architectures.expert_utilization(model, data[1][0][:100])["digit"]) == 3
    x = data[1][0][:64]
    assert_keras_round_trip(model, x, tmp_path)
    assert_saved_model_matches(model, {"image": x}, tmp_path)


def test_cgc_parameter_mode_equals_equal_weighting(data):
    x, y = data[0]
    assert_gradient_level_equals_equal_weighting(
        lambda: build("cgc"), x[:32], {k: v[:32] for k, v in y.items()}
    )


def test_cgc_with_stem_supports_representation():
    model = build("cgc", gate_input="stem")
    assert model.supports_representation
    assert_partition(model)


@pytest.mark.parametrize(
    "architecture, options, message",
    [
        ("ple", {"num_levels": 0}, "num_levels"),
        ("ple", {"num_shared_experts": 0}, "num_shared_experts"),
        ("cgc", {"num_task_experts": -1}, "num_task_experts"),
        ("ple", {"num_levels": 4}, "at least num_levels=4 stages"),
        ("cgc", {"num_levels": 2}, "Valid options: num_shared_experts, num_task_experts, gate_input"),
        ("cgc", {"gate_input": "tower"}, "gate_input"),
    ],
)
def test_bad_options_are_clear_errors(architecture, options, message):
    with pytest.raises(ValueError, match=message) as info:
        build(architecture, **options)
    assert "Received" in str(info.value)


def test_dict_inputs_are_refused():
    with pytest.raises(ValueError, match="task_routed"):
        kmtl.build_model(
            heads=task_heads(),
            trunk=trunks.dense((8,)),
            inputs={"a": (4,), "b": (4,)},
            architecture="ple",
            num_levels=1,
        )
