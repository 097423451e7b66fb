"""Cost of gradient-level strategies at 10 tasks: every step, every k steps, representation mode.

MultiLeNet with 10 classification heads, batch 256, synthetic inputs, PCGrad in
parameter mode (exact per-task gradients every step, or every k steps reusing the
weights in between) and in representation mode, against static equal weights.
Contenders alternate; the table gives the median step time over the repeats.

    python benchmarks/update_every.py [--tasks 10] [--steps 10] [--repeats 5] [--strategy pcgrad]
"""

import argparse
import os
import statistics
import time

import numpy as np
import tensorflow as tf

import kmtl
from kmtl import heads, trunks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--strategy", default="pcgrad")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((256 * args.steps, 28, 28, 1)).astype("float32")
    digit = rng.integers(0, 10, len(x))
    targets = {f"t{i}": (digit + i) % 10 for i in range(args.tasks)}
    data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(256).cache()

    def make(weighting):
        model = kmtl.build_model(
            input_shape=(28, 28, 1),
            trunk=trunks.lenet(),
            heads=[heads.Classification(f"t{i}", 10) for i in range(args.tasks)],
        )
        model.compile(optimizer="adam", weighting=weighting)
        model.fit(data.take(2), verbose=0)  # trace and build
        return model

    get = kmtl.weighting.get
    models = {
        "equal (static)": make(None),
        f"{args.strategy}, parameters, every step": make(get(args.strategy)),
        f"{args.strategy}, parameters, update_every=4": make(get(args.strategy, update_every=4)),
        f"{args.strategy}, parameters, update_every=10": make(get(args.strategy, update_every=10)),
        f"{args.strategy}, representation": make(get(args.strategy, mode="representation")),
    }
    times = {name: [] for name in models}
    load_start = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(data, verbose=0)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["equal (static)"])
    print(
        f"{args.tasks} tasks, batch 256, median of {args.repeats} alternating repeats of {args.steps} steps; "
        f"load average {load_start:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print("| contender | median step (ms) | ratio to equal |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(
            f"| {name} | {1000 * statistics.median(values):.1f} | {statistics.median(values) / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
