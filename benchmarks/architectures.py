"""Parameters and training step time of every architecture on one task set.

Task set: MNIST digit (10 classes) + parity (binary), conv trunk (32, 64 filters,
dense 128), batch 256, Adam, static equal weights. Each architecture with its
default options (MMoE: 4 experts; CGC: 2 shared + 1 per task; PLE: 2 levels;
task-routed: both heads reading one input, i.e. hard sharing through the routed
code path). Contenders alternate; each repeat times one epoch of `steps` steps
after a warm-up; the table gives the median step time and its ratio to hard
sharing.

    KMTL_DATA_DIR=../shared/data python benchmarks/architectures.py [--steps 20] [--repeats 3]
"""

import argparse
import statistics
import time

import tensorflow as tf

import kmtl
from kmtl import heads, trunks

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
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batches = kmtl.data.mnist_tasks(
        ["digit", "parity"], split=f"train[:{args.steps * 256}]", batch_size=256, shuffle=False
    ).cache()
    for _ in batches:
        pass
    routed = batches.map(lambda x, y: ({"image": x}, y)).cache()
    for _ in routed:
        pass
    models = {name: build(name, options) for name, options in CONTENDERS.items()}
    data = {name: routed if name == "task_routed" else batches for name in models}
    for name, model in models.items():  # warm-up: trace and build
        model.fit(data[name].take(2), epochs=1, verbose=0)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(data[name], epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["hard_sharing"])
    print("| architecture | parameters | shared | median step (ms) | min step (ms) | ratio to hard sharing |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        model = models[name]
        shared = sum(int(tf.size(v)) for v in model.shared_variables)
        print(
            f"| {name} | {model.count_params():,} | {shared:,} | {1000 * statistics.median(values):.1f} | "
            f"{1000 * min(values):.1f} | {statistics.median(values) / base:.2f} |"
        )


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    main()
