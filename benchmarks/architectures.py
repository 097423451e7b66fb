"""Parameters and training step time of every architecture on one task set.

Task set: MNIST digit (10 classes) + parity (binary), conv trunk (32, 64 filters,
dense 128), batch 256, Adam, static equal weights. Each architecture with its
default options (MMoE: 4 experts; CGC: 2 shared + 1 per task; PLE: 2 levels;
task-routed: both heads reading one input, i.e. hard sharing through the routed
code path). Contenders alternate in interleaved rounds (benchmarks/_harness.py);
each measurement is one `fit` epoch of `steps` steps after a warm-up; the table
gives the median and min step time and the ratio of medians to hard sharing.

    KMTL_DATA_DIR=../shared/data python benchmarks/architectures.py [--steps 20] [--repeats 3]
"""

import argparse
import time

import tensorflow as tf

import kmtl
from kmtl import heads, trunks

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.architectures`
    from benchmarks import _harness as harness

BASELINE = "hard_sharing"
CONTENDERS = {
    "hard_sharing": {},
    "mmoe": {"num_experts": 4},
    "cgc": {},
    "ple": {},
    "cross_stitch": {},
    "mtan": {},
    "task_routed": {"routes": {"digit": "image", "parity": "image"}},
}


def build(architecture, options):
    task_heads = [heads.Classification("digit", 10), heads.Binary("parity")]
    trunk = trunks.conv((32, 64), (128,))
    if architecture == "task_routed":
        model = kmtl.build_model(
            heads=task_heads, trunk=trunk, inputs={"image": (28, 28, 1)}, architecture=architecture, **options
        )
    else:
        model = kmtl.build_model(
            heads=task_heads, trunk=trunk, input_shape=(28, 28, 1), architecture=architecture, **options
        )
    model.compile(optimizer="adam")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, repeats=3, steps=20)
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    batches = kmtl.data.mnist_tasks(
        ["digit", "parity"], split=f"train[:{args.steps * 256}]", batch_size=256, shuffle=False
    ).cache()
    for _ in batches:
        pass
    routed = batches.map(lambda x, y: ({"image": x}, y)).cache()
    for _ in routed:
        pass

    def contender(name, options):
        data = routed if name == "task_routed" else batches
        held = {}

        def warmup():
            held["model"] = model = build(name, options)
            model.fit(data.take(2), epochs=1, verbose=0)  # trace and build
            return {
                "parameters": int(model.count_params()),
                "shared": sum(int(tf.size(v)) for v in model.shared_variables),
            }

        def measure():
            start = time.perf_counter()
            held["model"].fit(data, epochs=1, verbose=0)
            return (time.perf_counter() - start) / args.steps

        return harness.Contender(name, measure, warmup)

    title = (
        f"MNIST digit + parity, conv trunk (32, 64, dense 128), batch 256, {args.steps} steps per measurement"
    )
    with harness.Session(args, title=title) as session:
        results = session.alternate([contender(n, o) for n, o in CONTENDERS.items()], group="architectures")
        table = harness.Table(
            [
                "architecture",
                "parameters",
                "shared",
                "median step (ms)",
                "min step (ms)",
                "ratio to hard sharing",
            ],
            "lrrrrr",
        )
        for r in results.values():
            if not r.ok:
                table.row(r.name, "", "", "failed", "", r.error)
                continue
            table.row(
                r.name,
                f"{r.info['parameters']:,}",
                f"{r.info['shared']:,}",
                harness.ms(r.median),
                harness.ms(r.min),
                harness.ratio(results.ratio(r.name, BASELINE), suffix=""),
            )


if __name__ == "__main__":
    main()
