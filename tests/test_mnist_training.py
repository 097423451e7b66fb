"""Integration: dict-target fit on real MNIST from $KMTL_DATA_DIR."""

import keras

import kmtl
from kmtl import heads, trunks


def test_conv_trunk_reaches_95_percent_digit_accuracy(mnist_dir, tmp_path):
    keras.utils.set_random_seed(0)
    names = ["digit", "parity", "value"]
    train = kmtl.data.mnist_tasks(names, split="train[:30000]", batch_size=128, data_dir=mnist_dir)
    test = kmtl.data.mnist_tasks(names, split="test[:3000]", batch_size=512, data_dir=mnist_dir)
    model = kmtl.build_model(
        input_shape=(28, 28, 1),
        trunk=trunks.conv(filters=(16, 32), dense_units=(64,)),
        heads=[
            heads.Classification("digit", num_classes=10),
            heads.Binary("parity"),
            heads.Regression("value"),
        ],
    )
    model.compile(optimizer="adam", loss_weights={"digit": 1.0, "parity": 0.5, "value": 0.1})
    history = model.fit(train, validation_data=test, epochs=2, verbose=0)
    report = kmtl.evaluate(model, test)
    assert report["digit"]["accuracy"] >= 0.95, report
    assert report["parity"]["accuracy"] >= 0.93, report
    assert report["value"]["mae"] < 1.0, report
    assert history.history["val_digit_accuracy"][-1] == report["digit"]["accuracy"]
    served = kmtl.export.load(kmtl.export.saved_model(model, tmp_path / "served"))
    images, _ = next(iter(test))
    expected = model.predict(images, verbose=0)
    for name in names:
        assert abs(served(images.numpy())[name] - expected[name]).max() < 1e-4
