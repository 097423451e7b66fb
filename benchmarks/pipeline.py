"""Input pipeline speed vs the MultiLeNet training step rate, in one run.

Measures, in one process:

- the examples/s each kmtl.data pipeline delivers alone (no model):
  `mnist_tasks`, `fashion_tasks`, `multi_mnist` (sener and pareto recipes)
  and `mix` (MNIST digits + Fashion items, proportional sampler);
- the examples/s the MultiLeNet model (`kmtl.trunks.lenet()` with a `left`
  and a `right` classification head, batch 256) consumes in `fit` on one
  in-memory batch repeated (so input cost is negligible), and, as a
  reference, the original MultiLeNet (valid convolutions) in plain Keras;
- the cold generation time of the full MultiMNIST training set (first call in
  the process, including reading the IDX files) and the warm one (source
  images already in memory), with the file cache disabled.

Contenders alternate in interleaved rounds (benchmarks/_harness.py) and the
table reports the median over rounds, plus each pipeline's rate divided by
the training rate (target: at least 10x) and the generation time (target:
under 10 s).

Run (from the repository root):

    KMTL_DATA_DIR=/work/shared/data python benchmarks/pipeline.py [--repeats 5] [--batches 60] [--steps 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.pipeline`
    from benchmarks import _harness as harness

TRAINING = "training: kmtl MultiLeNet fit"
PLAIN = "reference: original MultiLeNet (valid convs) in plain Keras fit"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=60, help="pipeline batches per measurement")
    parser.add_argument("--batch-size", type=int, default=256)
    harness.add_arguments(parser, repeats=5, steps=15)
    return parser.parse_args()


def generation_times(recipes, session):
    """Cold (first in process) and median warm full-train-set generation times.

    `recipes` is the `kmtl.data.recipes` module.
    """
    start = time.perf_counter()
    recipes.multi_mnist_arrays("train", recipe="sener", cache_dir=False)
    cold = time.perf_counter() - start

    def generation(recipe):
        def measure():
            recipes.clear_memory_cache()
            start = time.perf_counter()
            recipes.multi_mnist_arrays("train", recipe=recipe, cache_dir=False)
            return time.perf_counter() - start

        return harness.Contender(recipe, measure)

    results = session.alternate([generation("sener"), generation("pareto")], group="MultiMNIST generation")
    recipes.clear_memory_cache()
    return cold, {recipe: r.median for recipe, r in results.items()}


def make_pipelines(data, batch_size):
    unbatched = {
        "digit": data.mnist_tasks(["digit"], split="train", batch_size=None, seed=0),
        "item": data.fashion_tasks(["item"], split="train", batch_size=None, seed=0),
    }
    return {
        "mnist_tasks (digit, parity)": data.mnist_tasks(
            ["digit", "parity"], split="train", batch_size=batch_size
        ),
        "fashion_tasks (item, group)": data.fashion_tasks(
            ["item", "group"], split="train", batch_size=batch_size
        ),
        "multi_mnist sener": data.multi_mnist(
            "train", recipe="sener", batch_size=batch_size, cache_dir=False
        ),
        "multi_mnist pareto": data.multi_mnist(
            "train", recipe="pareto", batch_size=batch_size, cache_dir=False
        ),
        "mix digit+item (proportional)": data.mix(unbatched, sampler="proportional", batch_size=batch_size),
    }


def pipeline_meter(name, dataset, batches):
    """A contender measuring seconds per example delivered by `dataset`."""
    held = {}

    def warmup():
        held["iterator"] = iterator = iter(dataset.repeat())
        for _ in range(3):  # builds buffers, shuffles, the first cache pass
            next(iterator)

    def measure():
        iterator = held["iterator"]
        count = 0
        start = time.perf_counter()
        for _ in range(batches):
            x = next(iterator)[0]
            count += int((next(iter(x.values())) if isinstance(x, dict) else x).shape[0])
        return (time.perf_counter() - start) / count

    return harness.Contender(name, measure, warmup)


def plain_keras_lenet():
    """Sener & Koltun's MultiLeNet in plain Keras (valid convolutions: a 320-wide flatten).

    A reference row: `kmtl.trunks.lenet()` pads its convolutions ("same"),
    so its flatten is 980 wide and its step costs more.
    """
    import keras

    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(10, 5)(inputs)
    h = keras.layers.ReLU()(keras.layers.MaxPooling2D()(h))
    h = keras.layers.Dropout(0.5)(keras.layers.Conv2D(20, 5)(h))
    h = keras.layers.ReLU()(keras.layers.MaxPooling2D()(h))
    h = keras.layers.Dense(50, activation="relu")(keras.layers.Flatten()(h))
    outputs = {task: keras.layers.Dense(10, activation="softmax", name=task)(h) for task in ("left", "right")}
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="adam",
        loss={task: "sparse_categorical_crossentropy" for task in outputs},
        metrics={task: [keras.metrics.SparseCategoricalAccuracy(name="accuracy")] for task in outputs},
    )
    return model


def training_meter(name, model, batch_size, steps):
    """A contender measuring seconds per example consumed by `model.fit`."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, 28, 28, 1)).astype("float32")
    y = {task: rng.integers(0, 10, batch_size) for task in ("left", "right")}
    batch = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)

    def warmup():
        model.fit(batch, steps_per_epoch=3, epochs=1, verbose=0)  # compiles the train step

    def measure():
        start = time.perf_counter()
        model.fit(batch, steps_per_epoch=steps, epochs=1, verbose=0)
        return (time.perf_counter() - start) / (steps * batch_size)

    return harness.Contender(name, measure, warmup)


def kmtl_lenet(kmtl):
    from kmtl import heads

    model = kmtl.build_model(
        input_shape=(28, 28, 1),
        trunk=kmtl.trunks.lenet(),
        heads=[heads.Classification("left", 10), heads.Classification("right", 10)],
    )
    model.compile(optimizer="adam", loss_weights={"left": 1.0, "right": 1.0})
    return model


def main():
    args = parse_args()
    session = harness.Session(args, title=f"batch size {args.batch_size}")
    from kmtl.data import recipes

    cold, warm = generation_times(recipes, session)

    import kmtl
    import kmtl.data as data

    meters = [
        pipeline_meter(name, ds, args.batches) for name, ds in make_pipelines(data, args.batch_size).items()
    ]
    meters.append(training_meter(TRAINING, kmtl_lenet(kmtl), args.batch_size, args.steps))
    meters.append(training_meter(PLAIN, plain_keras_lenet(), args.batch_size, args.steps))
    results = session.alternate(meters, group="pipelines and training")
    for r in results.values():
        if not r.ok:
            raise SystemExit(f"{r.name} failed: {r.error}")
    median = {name: 1.0 / r.median for name, r in results.items()}  # examples/s
    training, plain = median.pop(TRAINING), median.pop(PLAIN)

    print(f"\nbatch size {args.batch_size}; median of {args.repeats} interleaved rounds\n")
    print(
        "| contender | examples/s | ratio to kmtl training | target >= 10x | ratio to plain-Keras training |"
    )
    print("|---|---:|---:|---|---:|")
    for name, rate in median.items():
        ratio = rate / training
        verdict = "pass" if ratio >= 10 else "FAIL"
        print(f"| {name} | {rate:,.0f} | {ratio:,.1f}x | {verdict} | {rate / plain:,.1f}x |")
    print(f"| {TRAINING} | {training:,.0f} | 1.0x | | {training / plain:.2f}x |")
    print(f"| {PLAIN} | {plain:,.0f} | {plain / training:.2f}x | | 1.0x |")
    print()
    print("| MultiMNIST generation, full train set, file cache off | seconds | target < 10 s |")
    print("|---|---:|---|")
    print(
        f"| sener, cold (first call: IDX read + generation) | {cold:.2f} | {'pass' if cold < 10 else 'FAIL'} |"
    )
    for recipe, seconds in warm.items():
        count = "60,000" if recipe == "sener" else "120,000"
        print(
            f"| {recipe}, warm sources ({count} composites) | {seconds:.2f} | {'pass' if seconds < 10 else 'FAIL'} |"
        )
    session.close()


if __name__ == "__main__":
    main()
