"""Steps per second on more devices, more workers and lower precision, as ratios in one run.

Contenders (each a fresh process, or two for the two workers; a process is
what a user runs, and logical devices, the mixed-precision policy and
`TF_CONFIG` are all fixed at process start):

- `1 device`: `model.fit` on the default CPU device (the baseline);
- `2 logical devices`: `model.fit` under `tf.distribute.MirroredStrategy`
  over the CPU split into two logical devices (`ReductionToOneDevice`);
- `1 worker`: `kmtl.distributed.fit` without a strategy, in one process;
- `2 workers`: `kmtl.distributed.fit` under `MultiWorkerMirroredStrategy`,
  two processes on 127.0.0.1 (TF_CONFIG with free ports), the chief's
  step times;
- `mixed_float16`, `mixed_bfloat16`: `model.fit` on one device under that
  Keras policy (float32 is the `1 device` row).

Model: MultiLeNet (`kmtl.trunks.lenet()`) with two ten-class heads on
random 36x36 images (the MultiMNIST shape), global batch 256, Adam, once with
static weights and once with PCGrad (a gradient-level strategy). The same
global batch is split over devices or workers. A step's time is the time
between two `on_train_batch_end` calls; a run's figure is the median over
its measured steps after `--warmup-steps`. Rounds alternate the contenders
(each round starts one contender later); the table gives the median and min
over rounds of steps per second and the ratio of medians to `1 device`
(steps per second relative to it: above 1 is faster).

On this machine (2 cores) logical devices and local workers share the same
two cores: the table measures the overhead of splitting the batch and of the
collectives, not a speed-up. On CPUs float16 and bfloat16 are emulated or
converted around float32 kernels, so the mixed rows measure the cost of the
casts and of loss scaling, not the speed of a GPU's tensor cores.

    python benchmarks/scaling.py [--repeats 3] [--steps 40] [--weightings static pcgrad]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.scaling`
    from benchmarks import _harness as harness

BATCH = 256
CONTENDERS = ["1 device", "2 logical devices", "1 worker", "2 workers", "mixed_float16", "mixed_bfloat16"]
HERE = os.path.abspath(__file__)


# --- what runs in a measuring process --------------------------------------------------------------
def _child(config: dict) -> None:
    """Trains `config["steps"]` steps and prints one JSON line with the step times."""
    kind = config["kind"]
    import tensorflow as tf

    if kind == "2 logical devices":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = None
    if kind == "2 workers":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "2 logical devices":
        strategy = tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    import keras
    import numpy as np

    import kmtl
    from kmtl import heads, trunks

    if kind.startswith("mixed_"):
        keras.mixed_precision.set_dtype_policy(kind)
    rng = np.random.default_rng(0)
    n = 8 * BATCH
    x = rng.random((n, 36, 36, 1)).astype("float32")
    y = {"left": rng.integers(0, 10, n), "right": rng.integers(0, 10, n)}
    total = config["warmup_steps"] + config["steps"]

    def build():
        keras.utils.set_random_seed(0)
        model = kmtl.build_model(
            heads=[heads.Classification("left", 10), heads.Classification("right", 10)],
            trunk=trunks.lenet(),
            input_shape=(36, 36, 1),
        )
        weighting = None if config["weighting"] == "static" else config["weighting"]
        model.compile(optimizer="adam", weighting=weighting)
        return model

    times = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    if kind in ("1 worker", "2 workers"):
        with strategy.scope() if strategy is not None else _nothing():
            model = build()

        def dataset_fn(context):
            per_replica = context.get_per_replica_batch_size(BATCH)
            data = tf.data.Dataset.from_tensor_slices((x, y))
            data = data.shard(context.num_input_pipelines, context.input_pipeline_id)
            return data.batch(per_replica, drop_remainder=True).repeat().prefetch(2)

        kmtl.distributed.fit(
            model, dataset_fn, epochs=1, steps_per_epoch=total, callbacks=[Clock()], verbose=0
        )
    else:
        with strategy.scope() if strategy is not None else _nothing():
            model = build()
        data = (
            tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True).repeat().prefetch(2)
        )
        model.fit(data, epochs=1, steps_per_epoch=total, callbacks=[Clock()], verbose=0)
    steps = [b - a for a, b in zip(times, times[1:])][config["warmup_steps"] - 1 :]
    chief = kmtl.distributed.is_chief(strategy) if kind == "2 workers" else True
    if chief:
        print(
            "RESULT " + json.dumps({"step_seconds": statistics.median(steps), "steps": len(steps)}),
            flush=True,
        )


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run(kind: str, weighting: str, args) -> float:
    """Seconds per step of one run of contender `kind` (its own process or processes)."""
    config = {"kind": kind, "weighting": weighting, "steps": args.steps, "warmup_steps": args.warmup_steps}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, HERE, "--child", json.dumps(config)]
    if kind != "2 workers":
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        return _parse(kind, [result])
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [
        subprocess.Popen(
            command,
            env=dict(env, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=args.timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    return _parse(kind, results)


def _parse(kind, results) -> float:
    for result in results:
        if result.returncode != 0:
            raise RuntimeError(f"{kind}: exit {result.returncode}: {result.stderr[-1500:]}")
    lines = [line for r in results for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if len(lines) != 1:
        raise RuntimeError(f"{kind}: expected one RESULT line, got {lines}")
    return json.loads(lines[0][len("RESULT ") :])["step_seconds"]


# --- the run ---------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weightings", nargs="+", default=["static", "pcgrad"], help="strategies to time")
    parser.add_argument("--contenders", nargs="+", default=CONTENDERS, choices=CONTENDERS, metavar="NAME")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each runs every contender once)")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per run")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps per run not measured (tracing)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--json", metavar="PATH", help="also write every sample to this JSON file")
    args = parser.parse_args(argv)
    if "1 device" not in args.contenders:
        parser.error("the contenders must include '1 device' (the baseline of the ratios)")
    print(
        f"# scaling: MultiLeNet, 2 ten-class heads, 36x36 random images, global batch {BATCH}, Adam; "
        f"{args.repeats} rounds x {args.steps} steps (+{args.warmup_steps} warm-up) per run"
    )
    print(f"# {harness.machine_line()}; {harness.framework_versions()}; load at start {harness.load_line()}")
    start = time.perf_counter()
    samples = {w: {c: [] for c in args.contenders} for w in args.weightings}
    for round_index in range(args.repeats):
        for weighting in args.weightings:
            shift = round_index % len(args.contenders)
            for kind in args.contenders[shift:] + args.contenders[:shift]:
                seconds = _run(kind, weighting, args)
                samples[weighting][kind].append(seconds)
                print(
                    f"#   round {round_index + 1} {weighting:>7} {kind:<18} {1 / seconds:7.2f} steps/s",
                    flush=True,
                )
    table = harness.Table(
        ["weighting", "contender", "median steps/s", "best steps/s", "ratio to 1 device"], "llrrr"
    )
    for weighting in args.weightings:
        base = statistics.median(samples[weighting]["1 device"])
        for kind in args.contenders:
            values = samples[weighting][kind]
            median = statistics.median(values)
            table.row(
                weighting,
                kind,
                f"{1 / median:.2f}",
                f"{1 / min(values):.2f}",
                harness.ratio(base / median),
            )
    print(f"# wall {time.perf_counter() - start:.0f} s; load at end {harness.load_line()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"samples_seconds_per_step": samples, "args": vars(args)}, handle, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
    else:
        main()
