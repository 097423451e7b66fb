"""Cost of gradient-level strategies at 10 tasks: every step, every k steps, representation mode.

MultiLeNet with 10 classification heads, batch 256, synthetic inputs, PCGrad in
parameter mode (exact per-task gradients every step, or every k steps reusing the
weights in between) and in representation mode, against static equal weights.
Contenders alternate in interleaved rounds (benchmarks/_harness.py); each
measurement is one `fit` epoch of `steps` steps after a two-step warm-up, and the
table gives the median and min step time over the rounds.

    python benchmarks/update_every.py [--tasks 10] [--steps 10] [--repeats 5] [--strategy pcgrad]
"""

import argparse
import time

import numpy as np
import tensorflow as tf

import kmtl
from kmtl import heads, trunks

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.update_every`
    from benchmarks import _harness as harness

BASELINE = "equal (static)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--strategy", default="pcgrad")
    harness.add_arguments(parser, repeats=5, steps=10)
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    rng = np.random.default_rng(0)
    x = rng.random((256 * args.steps, 28, 28, 1)).astype("float32")
    digit = rng.integers(0, 10, len(x))
    targets = {f"t{i}": (digit + i) % 10 for i in range(args.tasks)}
    data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(256).cache()
    for _ in data:  # fill the cache before any measurement
        pass

    def contender(name, weighting):
        held = {}

        def warmup():
            held["model"] = model = kmtl.build_model(
                input_shape=(28, 28, 1),
                trunk=trunks.lenet(),
                heads=[heads.Classification(f"t{i}", 10) for i in range(args.tasks)],
            )
            model.compile(optimizer="adam", weighting=weighting)
            model.fit(data.take(2), verbose=0)  # trace and build

        def measure():
            start = time.perf_counter()
            held["model"].fit(data, verbose=0)
            return (time.perf_counter() - start) / args.steps

        return harness.Contender(name, measure, warmup)

    get = kmtl.weighting.get
    s = args.strategy
    title = f"MultiLeNet, {args.tasks} tasks, batch 256, {args.steps} steps per measurement, synthetic data"
    with harness.Session(args, title=title) as session:
        contenders = [
            contender(BASELINE, None),
            contender(f"{s}, parameters, every step", get(s)),
            contender(f"{s}, parameters, update_every=4", get(s, update_every=4)),
            contender(f"{s}, parameters, update_every=10", get(s, update_every=10)),
            contender(f"{s}, representation", get(s, mode="representation")),
        ]
        results = session.alternate(contenders, group=f"{args.tasks} tasks")
        table = harness.Table(["contender", "median step (ms)", "min step (ms)", "ratio to equal"], "lrrr")
        for r in results.values():
            if r.ok:
                table.row(
                    r.name,
                    harness.ms(r.median),
                    harness.ms(r.min),
                    harness.ratio(results.ratio(r.name, BASELINE)),
                )
            else:
                table.row(r.name, "failed", "", r.error)


if __name__ == "__main__":
    main()
