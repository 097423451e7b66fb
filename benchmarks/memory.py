"""Peak memory and step time of gradient-level strategies, per-task-gradient engine, task count.

Model: a dense trunk of many equal-size shared layers
(`kmtl.trunks.dense((1024,) * 8)`: a 32 -> 1024 layer, then seven
1024 x 1024 layers), T ten-class heads, batch 64, Adam, synthetic data of
input size 32. Contenders, at each T: equal weighting, and PCGrad, MGDA and
UPGrad in parameters mode with `engine="jacobian"` (every task's gradient of
every shared variable at once: `T x P` floats) and `engine="gram"` (the Gram
matrix accumulated stage by stage, then one weighted backward pass).

Each configuration runs in a fresh worker process (benchmarks/_harness.py),
which:

1. builds the model, compiles it with `kmtl.weighting.get("equal")` and runs
   one warm-up step: its resident memory then is the **baseline** (VmRSS:
   TensorFlow, the model, Adam's slots, one traced step);
2. compiles the same model (same optimizer object: no new slots) with the
   configuration's strategy, runs one step (tracing), resets the kernel's
   peak-RSS mark (`/proc/self/clear_refs`), and runs `--steps` more steps;
3. reads the process's peak memory: **extra** = ru_maxrss - baseline, i.e.
   the most the process ever held above the baseline (tracing included);
   **step peak** = VmHWM after the reset - VmRSS at the reset: what the
   steps alone held above the settled memory (empty if the reset is not
   allowed);
4. builds a second, equal-weight model and times the two alternately
   (`--repeats` rounds of one `--steps`-step `fit` epoch each): the step
   time ratio to equal weighting. (Memory was read before this model
   existed.)

Beside each row: the largest shared variable and T x that size (MiB), so the
target "Gram engine extra memory <= 2 x T x largest shared variable" can be
checked; for the Gram engine the check column compares with 2 x T x largest
both the row's extra memory minus the equal row's at the same T (an upper
bound: it includes tracing the strategy's step and allocator slack, tens of
MiB, which dominates at small T) and the step peak minus the equal row's step
peak (what the strategy's steps hold beyond an equal-weight step's). A configuration that cannot
run (an engine this kmtl does not have yet, an error) is reported with its
error, and the run goes on.

    python benchmarks/memory.py [--tasks 2 10 32] [--strategies pcgrad,mgda,upgrad]
        [--engines jacobian,gram] [--steps 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import time

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.memory`
    from benchmarks import _harness as harness

BATCH = 64
INPUT = 32
_SEEDED = []


# --- what runs in each configuration's worker ------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    return None


def _reset_peak() -> bool:
    """Resets VmHWM (the peak RSS the kernel reports) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def engine_facts() -> dict:
    """What this kmtl says about per-task-gradient engines (read from its own tree)."""
    import os

    import kmtl
    from kmtl.weighting import base as weighting_base

    root = os.path.dirname(kmtl.__file__)
    return {
        "kmtl": kmtl.__file__,
        "gram module": os.path.isfile(os.path.join(root, "backend", "tensorflow", "gram.py")),
        "engines": list(getattr(weighting_base, "ENGINES", None) or []) or None,
    }


def _build(spec):
    import keras
    import numpy as np
    import tensorflow as tf

    import kmtl
    from kmtl import heads

    tf.get_logger().setLevel("ERROR")
    if not _SEEDED:  # once per process: reseeding makes traced functions trace again
        keras.utils.set_random_seed(0)
        _SEEDED.append(0)
    tasks, steps = spec["tasks"], spec["steps"]
    model = kmtl.build_model(
        input_shape=(INPUT,),
        trunk=kmtl.trunks.dense((spec["units"],) * spec["layers"]),
        heads=[heads.Classification(f"t{i}", 10) for i in range(tasks)],
    )
    rng = np.random.default_rng(0)
    n = BATCH * steps
    x = rng.normal(size=(n, INPUT)).astype("float32")
    y = {f"t{i}": rng.integers(0, 10, size=(n,)).astype("int32") for i in range(tasks)}
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()
    for _ in data:
        pass
    return model, data


def _strategy(spec):
    import kmtl

    if spec["name"] == "equal":
        return kmtl.weighting.get("equal")
    engine = {} if spec["engine"] == "default" else {"engine": spec["engine"]}
    return kmtl.weighting.get(spec["name"], mode="parameters", **engine)


def _shared_sizes(model) -> list[int]:
    """Bytes of each shared variable (the model's `shared_variables`)."""
    import numpy as np

    return [int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.shared_variables]


def _timed(model, data, steps):
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = EpochTimer()

    def measure():
        model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
        return timer.seconds / steps

    return measure


def build_contender(spec: dict) -> harness.Contender:
    """spec: `{role: "target" | "reference", name, engine, tasks, steps, layers, units}`."""
    import keras

    model, data = _build(spec)
    steps = spec["steps"]
    if spec["role"] == "reference":

        def warmup():
            model.compile(optimizer="adam", weighting=_strategy({"name": "equal"}))
            model.fit(data.take(2), verbose=0, shuffle=False)

        return harness.Contender("reference", _timed(model, data, steps), warmup)

    optimizer = keras.optimizers.Adam()

    def warmup():
        model.compile(optimizer=optimizer, weighting=_strategy({"name": "equal"}))
        model.fit(data.take(1), verbose=0, shuffle=False)
        baseline = _status_bytes("VmRSS")
        before = _max_rss_bytes()
        strategy = _strategy(spec)  # may raise (an engine this kmtl lacks)
        model.compile(optimizer=optimizer, weighting=strategy)
        start = time.perf_counter()
        model.fit(data.take(1), verbose=0, shuffle=False)  # traces the strategy's step
        trace = time.perf_counter() - start
        reset = _reset_peak()
        settled = _status_bytes("VmRSS")
        model.fit(data, verbose=0, shuffle=False)
        high_water = _status_bytes("VmHWM")
        peak = _max_rss_bytes()
        sizes = _shared_sizes(model)
        return {
            "baseline rss": baseline,
            "peak before strategy": before,
            "peak": peak,
            "extra": peak - baseline,
            "step peak": (high_water - settled) if reset and high_water and settled else None,
            "largest shared": max(sizes),
            "shared": sum(sizes),
            "engine used": getattr(strategy, "engine", None),
            "trace seconds": trace,
        }

    return harness.Contender("target", _timed(model, data, steps), warmup)


# --- the run ---------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 32])
    parser.add_argument("--strategies", default="pcgrad,mgda,upgrad")
    parser.add_argument(
        "--engines",
        default="jacobian,gram",
        help="engine= values to compare; 'default' passes no engine argument (for a kmtl without one)",
    )
    parser.add_argument("--layers", type=int, default=8, help="shared Dense layers")
    parser.add_argument("--units", type=int, default=1024, help="units of each shared Dense layer")
    harness.add_arguments(parser, repeats=3, steps=5)
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    title = (
        f"dense trunk ({args.units},) x {args.layers}, input {INPUT}, batch {BATCH}, Adam; "
        f"{args.steps} steps per measurement; one fresh process per row"
    )
    with harness.Session(args, title=title) as session:
        probe = session.worker("probe", __file__)
        try:
            facts = probe.call("engine_facts")
            print(
                f"kmtl from {facts['kmtl']}: engines {facts['engines'] or 'none (no engine argument)'}; "
                f"kmtl/backend/tensorflow/gram.py {'present' if facts['gram module'] else 'absent'}"
            )
        except harness.WorkerError as error:
            print(f"could not ask kmtl about its engines: {harness.first_line(str(error))}")
        session.close_worker(probe)
        print(
            "MiB = 2**20 bytes. baseline = VmRSS after building the model and one warm-up step of equal "
            "weighting; extra = ru_maxrss - baseline; step peak = VmHWM - VmRSS over the timed steps only; "
            "over equal = extra - the equal row's extra at the same T; step peak over equal = step peak - the "
            "equal row's step peak at the same T\n"
        )
        table = harness.Table(
            [
                "tasks",
                "strategy",
                "engine",
                "baseline (MiB)",
                "peak (MiB)",
                "extra (MiB)",
                "over equal (MiB)",
                "step peak (MiB)",
                "step peak over equal (MiB)",
                "largest shared var (MiB)",
                "T x largest (MiB)",
                "<= 2 T largest (gram)",
                "step (ms)",
                "ratio to equal",
            ],
            "rllrrrrrrrrlrr",
        )
        errors = []
        for t in args.tasks:
            configs = [("equal", None)] + [(s, e) for s in strategies for e in engines]
            equal_extra = equal_peak = None
            for name, engine in configs:
                common = {"tasks": t, "steps": args.steps, "layers": args.layers, "units": args.units}
                spec = {"role": "target", "name": name, "engine": engine, **common}
                label = f"{t} tasks {name}" + (f" [{engine}]" if engine else "")
                worker = session.worker(label, __file__)
                try:
                    info = worker.build("target", spec)
                except harness.WorkerError as error:
                    errors.append(f"{label}: {harness.first_line(str(error))}")
                    table.row(t, name, engine or "", "", "", "", "", "", "", "", "could not run", "", "")
                    session.close_worker(worker)
                    continue
                target = harness.Contender(label, lambda w=worker: w.measure("target"))
                reference = session.remote(
                    worker, f"{t} tasks equal (reference)", {**spec, "role": "reference"}
                )
                results = session.alternate([target, reference], group=label)
                session.record(label, memory=info)
                session.close_worker(worker)
                if name == "equal":
                    equal_extra, equal_peak = info["extra"], info["step peak"]
                over = None if equal_extra is None else info["extra"] - equal_extra
                peak_over = (
                    None
                    if equal_peak is None or info["step peak"] is None
                    else info["step peak"] - equal_peak
                )
                largest = info["largest shared"]
                bound = 2 * t * largest
                check = ""
                if engine == "gram":
                    verdicts = [
                        f"{what} {'pass' if value <= bound else 'MISS'}"
                        for what, value in (("over equal", over), ("step peak over equal", peak_over))
                        if value is not None
                    ]
                    check = ", ".join(verdicts) + f" (bound {harness.mib(bound, 0)})"
                used = info.get("engine used")
                engine_cell = (engine or "") + (
                    f" (ran: {used})" if engine and used and used != engine else ""
                )
                table.row(
                    t,
                    name,
                    engine_cell,
                    harness.mib(info["baseline rss"]),
                    harness.mib(info["peak"]),
                    harness.mib(info["extra"]),
                    harness.mib(over),
                    harness.mib(info["step peak"]),
                    harness.mib(peak_over),
                    harness.mib(largest, 2),
                    harness.mib(t * largest),
                    check,
                    harness.ms(results[label].median),
                    harness.ratio(results.ratio(label, reference.name)),
                )
                for r in results.values():
                    if r.error:
                        errors.append(f"{r.name}: {r.error}")
        if errors:
            print("\ncould not run:" + "".join(f"\n  {e}" for e in errors))


if __name__ == "__main__":
    main()
