"""Training step time of every weighting strategy, as a ratio to static equal weights.

Model: MultiLeNet (`kmtl.trunks.lenet()`) with T ten-class heads `t0..t{T-1}`
on 28x28x1 inputs, batch 256, Adam. Data: synthetic (random images and
labels, cached in memory: only the step is timed). For each task count the
contenders are static equal weighting (`weighting=None`, the baseline), every
loss-level strategy, and every gradient-level strategy in
`mode="parameters"` and (where the strategy supports it) in
`mode="representation"`.

Each model is traced first (a two-step fit); then the contenders alternate,
round-robin over the repeats, each repeat being one `fit` epoch of `steps`
steps timed from `on_epoch_begin` to `on_epoch_end` (so `fit`'s setup is not
counted). The table gives the median and minimum step time over the repeats,
the ratio of medians to the baseline, and the issue's target for the row.

    python benchmarks/weighting.py [--tasks 2 10] [--steps 10] [--repeats 3] [--only pcgrad,mgda]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import kmtl
from kmtl import heads

BATCH = 256
BASELINE = "static (none)"


def targets(level: str, mode: str | None, num_tasks: int) -> float | None:
    """The issue's target ratio for a row (None: no target stated)."""
    if level == "loss":
        return 1.05
    if num_tasks == 2:
        return 1.35 if mode == "parameters" else 1.10
    if num_tasks == 10 and mode == "parameters":
        return 2.5
    return None


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each epoch (between epoch begin and end)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def dataset(num_tasks: int, steps: int, seed: int = 0) -> tf.data.Dataset:
    rng = np.random.default_rng(seed)
    n = steps * BATCH
    x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
    y = {f"t{i}": rng.integers(0, 10, size=(n,)).astype("int32") for i in range(num_tasks)}
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()
    for _ in data:  # fill the cache
        pass
    return data


def contenders(only: set[str] | None):
    """Yields (label, strategy name or None, mode or None, level)."""
    yield BASELINE, None, None, "none"
    for name in kmtl.weighting.names():
        if only and name not in only:
            continue
        strategy = kmtl.weighting.get(name)
        if strategy.level == "loss":
            yield name, name, None, "loss"
            continue
        yield f"{name} [parameters]", name, "parameters", "gradient"
        if strategy.supports_representation:
            yield f"{name} [representation]", name, "representation", "gradient"


def build(num_tasks: int, name: str | None, mode: str | None) -> kmtl.MultiTaskModel:
    keras.utils.set_random_seed(0)
    model = kmtl.build_model(
        input_shape=(28, 28, 1),
        trunk=kmtl.trunks.lenet(),
        heads=[heads.Classification(f"t{i}", 10) for i in range(num_tasks)],
    )
    weighting = None if name is None else kmtl.weighting.get(name, **({"mode": mode} if mode else {}))
    model.compile(optimizer="adam", weighting=weighting)
    return model


def run(num_tasks: int, steps: int, repeats: int, only: set[str] | None) -> list[dict]:
    data = dataset(num_tasks, steps)
    rows = []
    for label, name, mode, level in contenders(only):
        start = time.perf_counter()
        model = build(num_tasks, name, mode)
        model.fit(data.take(2), epochs=1, verbose=0, shuffle=False)  # trace
        rows.append(
            {
                "label": label,
                "level": level,
                "mode": mode,
                "model": model,
                "timer": EpochTimer(),
                "warmup": time.perf_counter() - start,
            }
        )
    for _ in range(repeats):
        for row in rows:
            row["model"].fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[row["timer"]])
    base = statistics.median(next(r for r in rows if r["label"] == BASELINE)["timer"].seconds)
    for row in rows:
        seconds = row.pop("timer").seconds
        row.pop("model")
        row["median"] = statistics.median(seconds) / steps
        row["min"] = min(seconds) / steps
        row["ratio"] = statistics.median(seconds) / base
        row["target"] = None if row["level"] == "none" else targets(row["level"], row["mode"], num_tasks)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated strategy names (baseline always runs)")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    if only:
        unknown = only - set(kmtl.weighting.names())
        if unknown:
            parser.error(f"unknown strategies {sorted(unknown)}; known: {kmtl.weighting.names()}")
    load_start = os.getloadavg()
    started = time.perf_counter()
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"date: {datetime.datetime.now().isoformat(timespec='minutes')}, host cores: {os.cpu_count()}, "
        f"python {platform.python_version()}, TF {tf.__version__}, Keras {keras.__version__}"
    )
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load_start)}")
    print(
        f"MultiLeNet, batch {BATCH}, {args.steps} steps x {args.repeats} alternating repeats, synthetic data"
    )
    print()
    print("| tasks | strategy | level | median step (ms) | min step (ms) | ratio to static | target | pass |")
    print("|---:|---|---|---:|---:|---:|---:|---|", flush=True)
    results, failures = {}, []
    for t in args.tasks:  # one group at a time, printed as soon as it is measured
        results[t] = rows = run(t, args.steps, args.repeats, only)
        for r in rows:
            target = r["target"]
            verdict = "" if target is None else ("pass" if r["ratio"] <= target else "MISS")
            if verdict == "MISS":
                failures.append(f"{t} tasks {r['label']} {r['ratio']:.2f}x > {target}x")
            print(
                f"| {t} | {r['label']} | {r['level']} | {1000 * r['median']:.1f} | {1000 * r['min']:.1f} | "
                f"{r['ratio']:.2f} | {'' if target is None else f'<= {target}'} | {verdict} |",
                flush=True,
            )
    print()
    print(
        "trace (warm-up) seconds: "
        + "; ".join(
            f"{t} tasks: max {max(r['warmup'] for r in rows):.1f} ({max(rows, key=lambda r: r['warmup'])['label']})"
            for t, rows in results.items()
        )
    )
    print(f"targets missed: {len(failures)}" + "".join(f"\n  {f}" for f in failures))
    print(
        f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"wall time {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    main()
