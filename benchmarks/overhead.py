"""kmtl's fit step time vs the same model written by hand in plain Keras.

Both models: conv trunk (32, 64 filters, dense 128) with digit/parity/value heads,
the same losses, loss weights and metrics, trained with `fit` on the same
in-memory MNIST batches (batch 128). Contenders alternate; each repeat times one
epoch of `steps` steps after a warm-up, and the table gives the median step time.

    KMTL_DATA_DIR=../shared/data python benchmarks/overhead.py [--steps 60] [--repeats 5]
"""

import argparse
import statistics
import time

import keras
import tensorflow as tf

import kmtl
from kmtl import heads, trunks

NAMES = ["digit", "parity", "value"]
WEIGHTS = {"digit": 1.0, "parity": 0.5, "value": 0.1}


def hand_written():
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = {
        "digit": keras.layers.Dense(10, activation="softmax", name="digit")(x),
        "parity": keras.layers.Dense(1, activation="sigmoid", name="parity")(x),
        "value": keras.layers.Dense(1, name="value")(x),
    }
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="adam",
        loss={
            "digit": keras.losses.SparseCategoricalCrossentropy(),
            "parity": keras.losses.BinaryCrossentropy(),
            "value": keras.losses.MeanSquaredError(),
        },
        loss_weights=WEIGHTS,
        metrics={
            "digit": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            "parity": [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
            "value": [keras.metrics.MeanAbsoluteError(name="mae")],
        },
    )
    return model


def with_kmtl():
    model = kmtl.build_model(
        input_shape=(28, 28, 1),
        trunk=trunks.conv((32, 64), (128,)),
        heads=[heads.Classification("digit", 10), heads.Binary("parity"), heads.Regression("value")],
    )
    model.compile(optimizer="adam", loss_weights=WEIGHTS)
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batches = kmtl.data.mnist_tasks(NAMES, split=f"train[:{args.steps * 128}]", batch_size=128, shuffle=False)
    data = batches.cache()
    for _ in data:
        pass
    models = {"keras (by hand)": hand_written(), "kmtl": with_kmtl()}
    for model in models.values():  # warm-up: trace and build
        model.fit(data.take(3), epochs=1, verbose=0)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(data, epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["keras (by hand)"])
    print("| model | median step (ms) | min step (ms) | ratio to hand-written |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(
            f"| {name} | {1000 * statistics.median(values):.1f} | {1000 * min(values):.1f} | "
            f"{statistics.median(values) / base:.3f} |"
        )


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    main()
