import keras
import pytest

from kmtl import trunks


def test_conv_trunk_shapes_and_options():
    trunk = trunks.conv(filters=(8, 16), dense_units=(32,), batch_norm=True, dropout=0.25)
    features = trunk(keras.Input((28, 28, 1)))
    assert tuple(features.shape) == (None, 32)
    blocks = trunk.stages("t")
    assert [b.name for b in blocks] == ["t_block_0", "t_block_1", "t_dense_block_0"]
    layer_types = [type(layer).__name__ for layer in blocks[0].layers]
    assert layer_types == ["Conv2D", "BatchNormalization", "Activation", "MaxPooling2D", "Dropout"]


def test_dense_trunk_flattens():
    features = trunks.dense((16, 8))(keras.Input((4, 4, 1)))
    assert tuple(features.shape) == (None, 8)


def test_lenet_is_multilenet():
    trunk = trunks.lenet()
    inp = keras.Input((28, 28, 1))
    model = keras.Model(inp, trunk(inp))
    convs = [
        layer
        for b in model.layers[1:]
        for layer in getattr(b, "layers", [])
        if isinstance(layer, keras.layers.Conv2D)
    ]
    assert [(c.filters, c.kernel_size) for c in convs] == [(10, (5, 5)), (20, (5, 5))]
    drops = [
        layer.rate
        for b in model.layers[1:]
        for layer in getattr(b, "layers", [])
        if isinstance(layer, keras.layers.Dropout)
    ]
    assert drops == [0.5]
    assert tuple(model.output.shape) == (None, 50)
    flatten = [
        layer
        for b in model.layers[1:]
        for layer in getattr(b, "layers", [])
        if isinstance(layer, keras.layers.Flatten)
    ][0]
    assert tuple(flatten.output.shape) == (None, 320)
    assert model.count_params() == 260 + 5020 + 320 * 50 + 50


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: trunks.conv(filters=()), "filters"),
        (lambda: trunks.conv(filters=(8, -1)), "filters"),
        (lambda: trunks.dense(units=()), "dense_units"),
        (lambda: trunks.conv(dropout=1.5), "dropout=1.5"),
        (lambda: trunks.Trunk("rnn"), "kind='rnn'"),
        (lambda: trunks.get("resnet"), "Unknown trunk 'resnet'"),
        (lambda: trunks.get("dense:64,x"), "positive layer sizes"),
        (lambda: trunks.get("dense:0"), "positive layer sizes"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_dense_sizes_by_name():
    assert trunks.get("dense:64,32") == trunks.dense((64, 32))


def test_conv_trunk_needs_images():
    with pytest.raises(ValueError, match="Received: input shape \\(None, 10\\)"):
        trunks.conv()(keras.Input((10,)))


@pytest.mark.parametrize(
    "trunk", [trunks.lenet(), trunks.dense((8,)), trunks.conv((4,), (8,), kernel_size=5)]
)
def test_serialization_round_trip(trunk):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(trunk))
    assert restored == trunk


def test_get_from_config_dict():
    assert trunks.get({"kind": "dense", "units": [8]}) == trunks.dense((8,))
    assert trunks.get("lenet") == trunks.lenet()
