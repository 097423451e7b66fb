"""Training step time of every weighting strategy, as a ratio to static equal weights.

Model: MultiLeNet (`kmtl.trunks.lenet()`) with T ten-class heads `t0..t{T-1}`
on 28x28x1 inputs, batch 256, Adam. Data: synthetic (random images and
labels, cached in memory: only the step is timed). For each task count the
contenders are static equal weighting (`weighting=None`, the baseline), every
loss-level strategy, and every gradient-level strategy in
`mode="parameters"` and (where the strategy supports it) in
`mode="representation"`.

Each model is traced first (a two-step fit); then the contenders alternate
in interleaved rounds (benchmarks/_harness.py), each measurement being one
`fit` epoch of `steps` steps timed from `on_epoch_begin` to `on_epoch_end`
(so `fit`'s setup is not counted). The table gives the median and minimum
step time over the rounds, the ratio of medians to the baseline, and the
issue's target for the row.

With `--trees old=/tmp/kmtl_old,new=/work/main` every contender runs once per
tree, each tree in its own worker process, alternating in the same rounds;
ratios to static are taken within a tree and the last column compares each
tree's step time to the first tree's.

    python benchmarks/weighting.py [--tasks 2 10] [--steps 10] [--repeats 3] [--only pcgrad,mgda]
                                   [--trees old=/tmp/kmtl_old,new=/work/main]
"""

from __future__ import annotations

import argparse
import sys
import time

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.weighting`
    from benchmarks import _harness as harness

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


# --- what runs in the measuring process (this one, or a tree's worker) ----------------------------
_DATA: dict = {}


def dataset(num_tasks: int, steps: int, seed: int = 0):
    """Synthetic MultiLeNet batches, cached in memory (one set per task count, shared by contenders)."""
    key = (num_tasks, steps, seed)
    if key not in _DATA:
        import numpy as np
        import tensorflow as tf

        _DATA.clear()
        rng = np.random.default_rng(seed)
        n = steps * BATCH
        x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
        y = {f"t{i}": rng.integers(0, 10, size=(n,)).astype("int32") for i in range(num_tasks)}
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()
        for _ in data:  # fill the cache
            pass
        _DATA[key] = data
    return _DATA[key]


def strategy_names() -> list[str]:
    import kmtl

    return list(kmtl.weighting.names())


def contender_specs(only: list[str] | None = None) -> list[dict]:
    """Every contender this kmtl offers: `{label, name, mode, level}` (baseline first)."""
    import kmtl

    specs = [{"label": BASELINE, "name": None, "mode": None, "level": "none"}]
    for name in kmtl.weighting.names():
        if only and name not in only:
            continue
        strategy = kmtl.weighting.get(name)
        if strategy.level == "loss":
            specs.append({"label": name, "name": name, "mode": None, "level": "loss"})
            continue
        specs.append(
            {"label": f"{name} [parameters]", "name": name, "mode": "parameters", "level": "gradient"}
        )
        if strategy.supports_representation:
            specs.append(
                {
                    "label": f"{name} [representation]",
                    "name": name,
                    "mode": "representation",
                    "level": "gradient",
                }
            )
    return specs


_SEEDED = []


def seed_once(seed: int = 0):
    """Seeds Python, NumPy, TF and Keras once per process.

    Not once per model: `keras.utils.set_random_seed` changes TF's global seed,
    which makes every `tf.function` traced before it trace again on its next
    call, so seeding while building the second model would put a retrace into
    the first model's next measurement.
    """
    if not _SEEDED:
        import keras

        keras.utils.set_random_seed(seed)
        _SEEDED.append(seed)


def build(num_tasks: int, name: str | None, mode: str | None):
    import tensorflow as tf

    import kmtl
    from kmtl import heads

    tf.get_logger().setLevel("ERROR")
    seed_once()
    model = kmtl.build_model(
        input_shape=(28, 28, 1),
        trunk=kmtl.trunks.lenet(),
        heads=[heads.Classification(f"t{i}", 10) for i in range(num_tasks)],
    )
    weighting = None if name is None else kmtl.weighting.get(name, **({"mode": mode} if mode else {}))
    model.compile(optimizer="adam", weighting=weighting)
    return model


def epoch_timer():
    """A Keras callback recording the wall time of each epoch (between epoch begin and end)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def build_contender(spec: dict) -> harness.Contender:
    """spec: `{tasks, steps, label, name, mode}` (see `contender_specs`)."""
    tasks, steps = spec["tasks"], spec["steps"]
    held = {}

    def warmup():
        data = dataset(tasks, steps)
        held["model"] = model = build(tasks, spec["name"], spec["mode"])
        model.fit(data.take(2), epochs=1, verbose=0, shuffle=False)  # trace
        held["timer"] = epoch_timer()

    def measure():
        held["model"].fit(
            dataset(tasks, steps), epochs=1, verbose=0, shuffle=False, callbacks=[held["timer"]]
        )
        return held["timer"].seconds[-1] / steps

    return harness.Contender(spec["label"], measure, warmup)


# --- the run ---------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--only", default="", help="comma-separated strategy names (baseline always runs)")
    harness.add_arguments(parser, repeats=3, steps=10, trees=True)
    args = parser.parse_args(argv)
    only = sorted({s.strip() for s in args.only.split(",") if s.strip()}) or None
    title = f"MultiLeNet, batch {BATCH}, {args.steps} steps per measurement, synthetic data"
    with harness.Session(args, title=title) as session:
        workers = session.workers(sys.modules[__name__])
        trees = [w.label for w in workers] if args.trees else [None]
        if only:
            for w in workers:
                unknown = set(only) - set(w.call("strategy_names"))
                if unknown:
                    print(f"{w.label or 'kmtl'}: no strategies {sorted(unknown)} (skipped there)")

        def name(label, tree):
            return label if tree is None else f"{label} @{tree}"

        columns = ["tasks", "strategy", "level"] + (["tree"] if args.trees else [])
        columns += ["median step (ms)", "min step (ms)", "ratio to static", "target", "pass"]
        columns += [f"ratio to {trees[0]}"] if args.trees else []
        table = harness.Table(
            columns, "rll" + ("l" if args.trees else "") + "rrrrl" + ("r" if args.trees else "")
        )
        warmups, failures, errors = {}, [], []
        for t in args.tasks:  # one group at a time, printed as soon as it is measured
            specs = {}  # label -> spec, in the first tree's order, then labels only later trees have
            offered = {}
            for w, tree in zip(workers, trees):
                offered[tree] = set()
                for spec in w.call("contender_specs", only):
                    specs.setdefault(spec["label"], spec)
                    offered[tree].add(spec["label"])
            contenders = [
                session.remote(w, name(label, tree), {**spec, "tasks": t, "steps": args.steps})
                for label, spec in specs.items()
                for w, tree in zip(workers, trees)
                if label in offered[tree]
            ]
            results = session.alternate(contenders, group=f"{t} tasks")
            for label, spec in specs.items():
                for tree in trees:
                    if label not in offered[tree]:
                        errors.append(f"{t} tasks {name(label, tree)}: not offered by this tree")
                        continue
                    r = results[name(label, tree)]
                    if not r.ok:
                        errors.append(f"{t} tasks {r.name}: {r.error}")
                        continue
                    warmups.setdefault((t, tree), []).append((r.warmup_seconds, label))
                    value = results.ratio(r.name, name(BASELINE, tree))
                    target = None if spec["level"] == "none" else targets(spec["level"], spec["mode"], t)
                    verdict = (
                        "" if target is None or value is None else ("pass" if value <= target else "MISS")
                    )
                    if verdict == "MISS":
                        failures.append(f"{t} tasks {r.name} {value:.2f}x > {target}x")
                    cells = [t, label, spec["level"]] + ([tree] if args.trees else [])
                    cells += [harness.ms(r.median), harness.ms(r.min), harness.ratio(value, suffix="")]
                    cells += ["" if target is None else f"<= {target}", verdict]
                    if args.trees:
                        cells.append(harness.ratio(results.ratio(r.name, name(label, trees[0]))))
                    table.row(*cells)
        print()
        for (t, tree), values in warmups.items():
            seconds, label = max(values)
            where = "" if tree is None else f" [{tree}]"
            print(f"trace (warm-up) seconds, {t} tasks{where}: max {seconds:.1f} ({label})")
        print(f"targets missed: {len(failures)}" + "".join(f"\n  {f}" for f in failures))
        if errors:
            print(f"could not run: {len(errors)}" + "".join(f"\n  {e}" for e in errors))


if __name__ == "__main__":
    main()
