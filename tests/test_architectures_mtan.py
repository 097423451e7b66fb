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
def trained(data):
    return train(build("mtan"), data[0])


def test_trains_above_chance_on_every_task(trained, data):
    scores = accuracies(trained, *data[1])
    assert scores["digit"] > 0.6, scores  # chance: 0.1
    assert scores["parity"] > 0.7, scores  # chance: 0.5


def test_conv_stages_shared_attention_and_towers_task_specific(trained):
    assert_partition(trained)
    shared = {v.path for v in trained.shared_variables}
    assert shared == {f"shared_block_{i}/shared_conv_{i}/{w}" for i in range(2) for w in ("kernel", "bias")}
    digit = {v.path for v in trained.task_variables["digit"]}
    assert any(p.startswith("digit_attention_1") for p in digit)
    assert any(p.startswith("digit_tower_dense_block_0") for p in digit)
    assert trained.supports_representation
    assert [tuple(t.shape[1:]) for t in trained.encoder.outputs] == [(14, 14, 4), (7, 7, 8)]


def test_round_trips_and_exports(trained, data, tmp_path):
    x = data[1][0][:64]
    assert_keras_round_trip(trained, x, tmp_path)
    assert_saved_model_matches(trained, {"image": x}, tmp_path)


@pytest.mark.parametrize("mode", ["parameters", "representation"])
def test_gradient_level_equals_equal_weighting(data, mode):
    x, y = data[0]
    assert_gradient_level_equals_equal_weighting(
        lambda: build("mtan"), x[:32], {k: v[:32] for k, v in y.items()}, mode=mode
    )


def test_dense_trunk_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a conv trunk") as info:
        kmtl.build_model(
            heads=task_heads(), trunk=trunks.dense((16,)), input_shape=(28, 28, 1), architecture="mtan"
        )
    assert "Received: trunk=" in str(info.value)


def test_takes_no_options():
    with pytest.raises(ValueError, match="Valid options: none"):
        build("mtan", num_experts=2)
