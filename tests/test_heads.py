import keras
import numpy as np
import pytest

from kmtl import heads


def test_default_losses_and_metrics():
    assert isinstance(heads.Classification("digit", 10).loss(), keras.losses.SparseCategoricalCrossentropy)
    assert isinstance(heads.Binary("parity").loss(), keras.losses.BinaryCrossentropy)
    assert isinstance(heads.Regression("value").loss(), keras.losses.MeanSquaredError)
    assert isinstance(heads.MultiLabel("tags", 3).loss(), keras.losses.BinaryCrossentropy)
    assert heads.Classification("digit", 10).loss().reduction == "mean_with_sample_weight"
    assert [m.name for m in heads.Binary("parity").metrics()] == ["accuracy", "auc"]


@pytest.mark.parametrize(
    "head,units,activation",
    [
        (heads.Classification("digit", 10), 10, "softmax"),
        (heads.Binary("parity"), 1, "sigmoid"),
        (heads.MultiLabel("tags", 4), 4, "sigmoid"),
        (heads.Regression("value", units=2), 2, "linear"),
    ],
)
def test_head_builds_output(head, units, activation):
    out = head(keras.Input((8,)))
    assert tuple(out.shape) == (None, units)
    assert out._keras_history.operation.name == f"{head.name}_output"


def test_tower_layers():
    head = heads.Classification("digit", 10, hidden_units=(16, 8), dropout=0.1)
    model = keras.Model(inp := keras.Input((4, 4)), head(inp))
    names = [layer.name for layer in model.layers]
    assert names[1:] == [
        "digit_flatten",
        "digit_hidden_0",
        "digit_dropout_0",
        "digit_hidden_1",
        "digit_dropout_1",
        "digit_output",
    ]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: heads.Classification("1digit", 10), "valid Python identifier"),
        (lambda: heads.Classification("class", 10), "valid Python identifier"),
        (lambda: heads.Classification("digit", 0), "num_classes=0"),
        (lambda: heads.Classification("digit", 1), "num_classes=1"),
        (lambda: heads.MultiLabel("tags", -2), "num_labels=-2"),
        (lambda: heads.Regression("value", units=1.5), "units=1.5"),
        (lambda: heads.Binary("p", hidden_units=(0,)), "hidden_units=0"),
        (lambda: heads.Binary("p", dropout=1.0), "dropout=1.0"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_duplicate_names_and_unknown_kind():
    with pytest.raises(ValueError, match="duplicate name 'digit'"):
        heads.validate([heads.Binary("digit"), heads.Classification("digit", 10)])
    with pytest.raises(ValueError, match="Unknown head kind 'ranking'"):
        heads.get({"kind": "ranking", "name": "r"})
    with pytest.raises(ValueError, match="at least one head"):
        heads.validate([])
    assert heads.get({"kind": "binary", "name": "p"}) == heads.Binary("p")


@pytest.mark.parametrize(
    "head",
    [
        heads.Classification("digit", 10, hidden_units=(5,)),
        heads.Binary("parity"),
        heads.MultiLabel("tags", 3, dropout=0.2),
        heads.Regression("value", units=2),
    ],
)
def test_serialization_round_trip(head):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    assert type(restored) is type(head) and restored.get_config() == head.get_config()


def test_target_spec_checks():
    head = heads.Classification("digit", 10)
    head.check_target_spec((None,), "int32")
    head.check_target_spec((None, 1), "int64")
    with pytest.raises(ValueError, match=r"Head 'digit' .* Received: shape=\(None, 10\)"):
        head.check_target_spec((None, 10), "float32")
    with pytest.raises(ValueError, match="numeric targets. Received: dtype=string"):
        head.check_target_spec((None,), "string")
    heads.MultiLabel("tags", 3).check_target_spec((32, 3), "float32")
    with pytest.raises(ValueError, match="Received: shape=\\(32,\\)"):
        heads.MultiLabel("tags", 3).check_target_spec((32,), "float32")
    assert np.isfinite(heads.Classification("d", 3).label_range()[1])
