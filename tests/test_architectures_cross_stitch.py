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
    train,
)

import kmtl
from kmtl import heads


@pytest.fixture(scope="module")
def data():
    return digit_parity("train"), digit_parity("test", 1000)


@pytest.fixture(scope="module")
def trained(data):
    return train(build("cross_stitch"), data[0])


def test_trains_above_chance_on_every_task(trained, data):
    scores = accuracies(trained, *data[1])
    assert scores["digit"] > 0.6, scores  # chance: 0.1
    assert scores["parity"] > 0.7, scores  # chance: 0.5


def test_columns_and_units_are_shared_heads_are_not(trained):
    assert_partition(trained)
    shared = {v.path for v in trained.shared_variables}
    assert any(p.startswith("digit_column") for p in shared)
    assert any(p.startswith("parity_column") for p in shared)
    assert {p for p in shared if p.startswith("cross_stitch")} == {
        f"cross_stitch_{i}/alpha" for i in range(3)
    }
    assert all(v.path.startswith("digit_") for v in trained.task_variables["digit"])
    assert not trained.supports_representation


def test_units_start_near_identity_and_learn():
    model = build("cross_stitch", self_weight=0.8)
    np.testing.assert_allclose(
        model.encoder.get_layer("cross_stitch_0").alpha.numpy(), [[0.8, 0.2], [0.2, 0.8]]
    )


def test_trained_units_moved(trained):
    alpha = trained.encoder.get_layer("cross_stitch_1").alpha.numpy()
    assert not np.allclose(alpha, [[0.9, 0.1], [0.1, 0.9]])


def test_round_trips_and_exports(trained, data, tmp_path):
    x = data[1][0][:64]
    loaded = assert_keras_round_trip(trained, x, tmp_path)
    np.testing.assert_allclose(
        loaded.encoder.get_layer("cross_stitch_2").alpha.numpy(),
        trained.encoder.get_layer("cross_stitch_2").alpha.numpy(),
    )
    assert_saved_model_matches(trained, {"image": x}, tmp_path)


def test_parameter_mode_equals_equal_weighting(data):
    x, y = data[0]
    assert_gradient_level_equals_equal_weighting(
        lambda: build("cross_stitch"), x[:32], {k: v[:32] for k, v in y.items()}
    )


def test_needs_two_heads():
    with pytest.raises(ValueError, match="two or more tasks"):
        kmtl.build_model(heads=[heads.Binary("parity")], input_shape=(28, 28, 1), architecture="cross_stitch")


@pytest.mark.parametrize("value", [0.0, 1.5, "high"])
def test_bad_self_weight(value):
    with pytest.raises(ValueError, match="self_weight"):
        build("cross_stitch", self_weight=value)
