"""kmtl's fit step time vs the same model written by hand in plain Keras.

Configurations (`--heads`):

- `mixed`: conv trunk (32, 64 filters, dense 128) with digit (10 classes),
  parity (binary) and value (regression) heads, static loss weights 1, 0.5,
  0.1, the same losses and metrics on both sides;
- an integer T: the same trunk with T ten-class heads `t0..t{T-1}` (targets
  `(digit + i) % 10`), static loss weights 1, sparse categorical
  cross-entropy and accuracy per head.

The hand-written model has the same layers, compiled with a loss dict and
trained with plain `keras.Model.fit`; kmtl's is `kmtl.build_model` +
`compile(loss_weights=...)` (no weighting strategy). Both train with `fit` on
the same in-memory MNIST batches (batch 128). Contenders alternate in
interleaved rounds (benchmarks/_harness.py); each measurement is one `fit`
epoch of `steps` steps after a warm-up, and the table gives the median and
min step time and the ratio of medians to the hand-written model.

With `--trees old=/tmp/kmtl_old,new=/work/main` the kmtl model runs once per
tree, each in its own worker process, alternating with the hand-written model
(which runs in the first tree's worker; it does not use kmtl).

    KMTL_DATA_DIR=../shared/data python benchmarks/overhead.py [--heads mixed 10 40] [--steps 60]
        [--repeats 5] [--trees old=/tmp/kmtl_old,new=/work/main]
"""

from __future__ import annotations

import argparse
import sys
import time

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.overhead`
    from benchmarks import _harness as harness

BATCH = 128
NAMES = ["digit", "parity", "value"]
WEIGHTS = {"digit": 1.0, "parity": 0.5, "value": 0.1}
HAND = "keras (by hand)"


def head_config(text: str):
    if text == "mixed":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'mixed' or a positive head count, got {text!r}")
    return value


def task_names(heads) -> list[str]:
    return NAMES if heads == "mixed" else [f"t{i}" for i in range(heads)]


def loss_weights(heads) -> dict:
    return WEIGHTS if heads == "mixed" else {name: 1.0 for name in task_names(heads)}


# --- what runs in the measuring process (this one, or a tree's worker) ----------------------------
_DATA: dict = {}


def dataset(heads, steps: int):
    """In-memory MNIST batches with the configuration's targets."""
    key = (heads, steps)
    if key not in _DATA:
        import tensorflow as tf

        import kmtl

        tf.get_logger().setLevel("ERROR")
        _DATA.clear()
        split = f"train[:{steps * BATCH}]"
        if heads == "mixed":
            data = kmtl.data.mnist_tasks(NAMES, split=split, batch_size=BATCH, shuffle=False)
        else:
            names = task_names(heads)
            data = kmtl.data.mnist_tasks(["digit"], split=split, batch_size=BATCH, shuffle=False).map(
                lambda x, y: (x, {n: (y["digit"] + i) % 10 for i, n in enumerate(names)})
            )
        data = data.cache()
        for _ in data:
            pass
        _DATA[key] = data
    return _DATA[key]


def _hand_trunk(inputs):
    import keras

    x = inputs
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    return keras.layers.Dense(128, activation="relu")(x)


def hand_written(heads):
    import keras

    inputs = keras.Input((28, 28, 1))
    x = _hand_trunk(inputs)
    if heads == "mixed":
        outputs = {
            "digit": keras.layers.Dense(10, activation="softmax", name="digit")(x),
            "parity": keras.layers.Dense(1, activation="sigmoid", name="parity")(x),
            "value": keras.layers.Dense(1, name="value")(x),
        }
        loss = {
            "digit": keras.losses.SparseCategoricalCrossentropy(),
            "parity": keras.losses.BinaryCrossentropy(),
            "value": keras.losses.MeanSquaredError(),
        }
        metrics = {
            "digit": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            "parity": [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
            "value": [keras.metrics.MeanAbsoluteError(name="mae")],
        }
    else:
        names = task_names(heads)
        outputs = {n: keras.layers.Dense(10, activation="softmax", name=n)(x) for n in names}
        loss = {n: keras.losses.SparseCategoricalCrossentropy() for n in names}
        metrics = {n: [keras.metrics.SparseCategoricalAccuracy(name="accuracy")] for n in names}
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=loss, loss_weights=loss_weights(heads), metrics=metrics)
    return model


def with_kmtl(heads):
    import kmtl
    from kmtl import heads as kheads
    from kmtl import trunks

    if heads == "mixed":
        task_heads = [kheads.Classification("digit", 10), kheads.Binary("parity"), kheads.Regression("value")]
    else:
        task_heads = [kheads.Classification(n, 10) for n in task_names(heads)]
    model = kmtl.build_model(input_shape=(28, 28, 1), trunk=trunks.conv((32, 64), (128,)), heads=task_heads)
    model.compile(optimizer="adam", loss_weights=loss_weights(heads))
    return model


def build_contender(spec: dict) -> harness.Contender:
    """spec: `{kind: "keras" | "kmtl", heads: "mixed" | T, steps}`."""
    heads, steps = spec["heads"], spec["steps"]
    held = {}

    def warmup():
        data = dataset(heads, steps)
        held["model"] = model = hand_written(heads) if spec["kind"] == "keras" else with_kmtl(heads)
        model.fit(data.take(3), epochs=1, verbose=0, shuffle=False)  # trace and build
        return {"parameters": int(model.count_params())}

    def measure():
        data = dataset(heads, steps)
        start = time.perf_counter()
        held["model"].fit(data, epochs=1, verbose=0, shuffle=False)
        return (time.perf_counter() - start) / steps

    return harness.Contender(spec["kind"], measure, warmup)


# --- the run ---------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--heads",
        type=head_config,
        nargs="+",
        default=["mixed", 10, 40],
        help="configurations: 'mixed' (digit, parity, value) and/or head counts of ten-class heads",
    )
    harness.add_arguments(parser, repeats=5, steps=60, trees=True)
    args = parser.parse_args(argv)
    title = f"conv trunk (32, 64 filters, dense 128), batch {BATCH}, static loss weights, MNIST in memory"
    with harness.Session(args, title=title) as session:
        workers = session.workers(sys.modules[__name__])
        trees = [w.label for w in workers] if args.trees else [None]

        def kmtl_name(tree):
            return "kmtl" if tree is None else f"kmtl @{tree}"

        columns = [
            "heads",
            "model",
            "parameters",
            "median step (ms)",
            "min step (ms)",
            "ratio to hand-written",
        ]
        columns += [f"ratio to kmtl @{trees[0]}"] if args.trees else []
        table = harness.Table(columns, "llrrrr" + ("r" if args.trees else ""))
        errors = []
        for heads in args.heads:
            label = "3 (digit, parity, value)" if heads == "mixed" else str(heads)
            contenders = [
                session.remote(workers[0], HAND, {"kind": "keras", "heads": heads, "steps": args.steps})
            ]
            contenders += [
                session.remote(w, kmtl_name(tree), {"kind": "kmtl", "heads": heads, "steps": args.steps})
                for w, tree in zip(workers, trees)
            ]
            results = session.alternate(contenders, group=f"{label} heads")
            for r in results.values():
                if not r.ok:
                    errors.append(f"{label} heads, {r.name}: {r.error}")
                    continue
                cells = [
                    label,
                    r.name,
                    f"{r.info.get('parameters', 0):,}",
                    harness.ms(r.median),
                    harness.ms(r.min),
                ]
                cells.append(harness.ratio(results.ratio(r.name, HAND), digits=3, suffix=""))
                if args.trees:
                    reference = kmtl_name(trees[0])
                    cells.append("" if r.name == HAND else harness.ratio(results.ratio(r.name, reference), 3))
                table.row(*cells)
        if errors:
            print("\ncould not run:" + "".join(f"\n  {e}" for e in errors))


if __name__ == "__main__":
    main()
