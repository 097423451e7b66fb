"""PCGrad's cost over equal weighting: a hand-written PyTorch MultiLeNet vs kmtl, in one run.

PyTorch side (CPU, `torch.set_num_threads(--threads)`): the MultiLeNet of
`kmtl.trunks.lenet()` written by hand: conv 10@5x5 (valid), max-pool 2,
ReLU; conv 20@5x5 (valid), max-pool 2, ReLU, dropout 0.5; flatten (320);
linear 50 + ReLU; T linear heads of 10 classes, cross-entropy, Adam (lr
1e-3), batch 256, synthetic inputs of MultiMNIST's shape (1 x 28 x 28, i.e.
kmtl's 28 x 28 x 1 in PyTorch's channels-first layout). Two contenders:

- equal weighting: one backward pass of the summed losses;
- PCGrad the way LibMTL does it: one backward pass per task (autograd of
  that task's loss with respect to the shared parameters and its own head),
  the shared gradients flattened into a `[T, P]` matrix, each task's row
  projected in turn away from every other task's gradient it conflicts with
  (random order, one scalar test per pair), the rows summed and written back
  as the shared parameters' gradients, then one optimizer step.

kmtl side (the same process layout, TensorFlow's intra-op threads set to
`--threads`): `kmtl.build_model(trunk=kmtl.trunks.lenet())` with T ten-class
heads, batch 256, Adam, compiled with `weighting=kmtl.weighting.get(name,
mode=...)`: equal weighting (the baseline) and PCGrad, MGDA and UPGrad in
parameters mode and in representation mode. Model, data and timing are
benchmarks/weighting.py's (one `fit` epoch of `steps` steps per measurement,
timed from epoch begin to end; kmtl's step also updates per-head accuracy
metrics, which the PyTorch loop does not).

Each side runs in its own worker process (benchmarks/_harness.py); all
contenders of a task count alternate in interleaved rounds, one block at a
time. Ratios are taken to the equal weighting of the same framework.
Parameters mode (and PyTorch) runs at `--tasks`; representation mode also at
`--rep-tasks`. Without PyTorch installed the PyTorch contenders are skipped
with a message.

    python benchmarks/peer_torch.py [--tasks 2 10] [--rep-tasks 40] [--strategies pcgrad,mgda,upgrad]
        [--steps 10] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time

try:
    import _harness as harness
    import weighting as weighting_benchmark
except ImportError:  # run as `python -m benchmarks.peer_torch`
    from benchmarks import _harness as harness
    from benchmarks import weighting as weighting_benchmark

BATCH = weighting_benchmark.BATCH
TORCH_EQUAL = "torch equal"
TORCH_PCGRAD = "torch pcgrad (LibMTL way)"
KMTL_EQUAL = "kmtl equal"


# --- PyTorch side (runs in the torch worker; imports no TensorFlow) -------------------------------
def _torch(threads: int):
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch


def torch_multilenet(torch, num_tasks: int):
    nn, F = torch.nn, torch.nn.functional

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 10, 5)
            self.conv2 = nn.Conv2d(10, 20, 5)
            self.dropout = nn.Dropout(0.5)
            self.dense = nn.Linear(320, 50)

        def forward(self, x):
            x = F.relu(F.max_pool2d(self.conv1(x), 2))
            x = self.dropout(F.relu(F.max_pool2d(self.conv2(x), 2)))
            return F.relu(self.dense(torch.flatten(x, 1)))

    trunk = Trunk()
    heads = nn.ModuleList(nn.Linear(50, 10) for _ in range(num_tasks))
    return trunk, heads


def torch_contender(spec: dict) -> harness.Contender:
    """spec: `{framework: "torch", method: "equal" | "pcgrad", tasks, steps, threads}`."""
    torch = _torch(spec["threads"])
    F = torch.nn.functional
    tasks, steps = spec["tasks"], spec["steps"]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps, BATCH, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (steps, tasks, BATCH), generator=generator)
    trunk, heads = torch_multilenet(torch, tasks)
    trunk.train()
    heads.train()
    shared = list(trunk.parameters())
    sizes = [p.numel() for p in shared]
    optimizer = torch.optim.Adam(list(trunk.parameters()) + list(heads.parameters()), lr=1e-3)
    order = random.Random(0)

    def losses(batch):
        features = trunk(x[batch])
        return [F.cross_entropy(head(features), y[batch, t]) for t, head in enumerate(heads)]

    def equal_step(batch):
        optimizer.zero_grad(set_to_none=True)
        torch.stack(losses(batch)).sum().backward()
        optimizer.step()

    def pcgrad_step(batch):
        optimizer.zero_grad(set_to_none=True)
        task_losses = losses(batch)
        grads = torch.empty(tasks, sum(sizes))
        for t, loss in enumerate(task_losses):  # one backward pass per task
            own = list(heads[t].parameters())
            parts = torch.autograd.grad(loss, shared + own, retain_graph=t + 1 < tasks)
            grads[t] = torch.cat([g.reshape(-1) for g in parts[: len(shared)]])
            for p, g in zip(own, parts[len(shared) :]):
                p.grad = g
        projected = grads.clone()
        for i in range(tasks):
            others = list(range(tasks))
            order.shuffle(others)
            for j in others:
                dot = torch.dot(projected[i], grads[j])
                if dot < 0:
                    projected[i] -= dot * grads[j] / grads[j].dot(grads[j])
        update = projected.sum(0)
        for p, g in zip(shared, torch.split(update, sizes)):
            p.grad = g.view_as(p).clone()
        optimizer.step()

    step = {"equal": equal_step, "pcgrad": pcgrad_step}[spec["method"]]

    def warmup():
        for batch in range(min(2, steps)):
            step(batch)
        return {"threads": torch.get_num_threads(), "shared parameters": sum(sizes)}

    def measure():
        start = time.perf_counter()
        for batch in range(steps):
            step(batch)
        return (time.perf_counter() - start) / steps

    return harness.Contender(spec["method"], measure, warmup)


# --- kmtl side (runs in the kmtl worker) ------------------------------------------------------------
_TF_THREADS = {}


def _configure_tensorflow(threads: int):
    """TensorFlow's intra-op threads, set once before its first op."""
    import tensorflow as tf

    if not _TF_THREADS:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        _TF_THREADS["intra"] = threads
    return _TF_THREADS["intra"]


def kmtl_contender(spec: dict) -> harness.Contender:
    """spec: `{framework: "kmtl", name, mode, tasks, steps, threads}` (benchmarks/weighting.py's model)."""
    threads = _configure_tensorflow(spec["threads"])
    contender = weighting_benchmark.build_contender(
        {
            "label": spec["name"],
            "name": spec["name"],
            "mode": spec["mode"],
            "tasks": spec["tasks"],
            "steps": spec["steps"],
        }
    )
    contender.info["threads"] = threads
    return contender


def build_contender(spec: dict) -> harness.Contender:
    return torch_contender(spec) if spec["framework"] == "torch" else kmtl_contender(spec)


# --- the run ---------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=[2, 10], help="task counts of every contender"
    )
    parser.add_argument(
        "--rep-tasks", type=int, nargs="*", default=[40], help="more task counts for representation mode only"
    )
    parser.add_argument(
        "--strategies", default="pcgrad,mgda,upgrad", help="kmtl strategies (comma-separated)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads and TensorFlow's intra-op threads (default: the usable cores)",
    )
    harness.add_arguments(parser, repeats=5, steps=10)
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    have_torch = importlib.util.find_spec("torch") is not None
    versions = ("tensorflow", "keras") + (("torch",) if have_torch else ())
    title = f"MultiLeNet, batch {BATCH}, {args.steps} steps per measurement, synthetic data, {args.threads} threads"
    with harness.Session(args, title=title, versions=versions) as session:
        if not have_torch:
            print(
                "PyTorch is not installed: the PyTorch contenders are skipped (pip install torch==2.13.0)\n"
            )
        env = {"OMP_NUM_THREADS": str(args.threads)}
        torch_worker = session.worker("torch", __file__, env=env) if have_torch else None
        kmtl_worker = session.worker("kmtl", __file__, env=env)
        common = {"steps": args.steps, "threads": args.threads}
        table = harness.Table(
            [
                "tasks",
                "framework",
                "contender",
                "median step (ms)",
                "min step (ms)",
                "ratio to equal (same framework)",
            ],
            "rllrrr",
        )
        summary, errors = {}, []
        for t in sorted(set(args.tasks) | set(args.rep_tasks)):
            full = t in args.tasks
            contenders, baseline = [], {}
            if torch_worker is not None and full:
                for method, label in (("equal", TORCH_EQUAL), ("pcgrad", TORCH_PCGRAD)):
                    spec = {"framework": "torch", "method": method, "tasks": t, **common}
                    contenders.append(session.remote(torch_worker, label, spec))
                    baseline[label] = TORCH_EQUAL
            spec = {"framework": "kmtl", "name": "equal", "mode": None, "tasks": t, **common}
            contenders.append(session.remote(kmtl_worker, KMTL_EQUAL, spec))
            baseline[KMTL_EQUAL] = KMTL_EQUAL
            for name in strategies:
                for mode in ("parameters", "representation") if full else ("representation",):
                    label = f"kmtl {name} [{mode}]"
                    spec = {"framework": "kmtl", "name": name, "mode": mode, "tasks": t, **common}
                    contenders.append(session.remote(kmtl_worker, label, spec))
                    baseline[label] = KMTL_EQUAL
            results = session.alternate(contenders, group=f"{t} tasks")
            for r in results.values():
                if not r.ok:
                    errors.append(f"{t} tasks, {r.name}: {r.error}")
                    continue
                value = results.ratio(r.name, baseline[r.name])
                summary.setdefault(r.name, {})[t] = value
                framework = r.name.split(" ", 1)[0]
                table.row(t, framework, r.name, harness.ms(r.median), harness.ms(r.min), harness.ratio(value))
            cross = results.ratio(KMTL_EQUAL, TORCH_EQUAL)
            if cross is not None:
                summary.setdefault("kmtl equal / torch equal (step time)", {})[t] = cross
        counts = sorted(set(args.tasks) | set(args.rep_tasks))
        print("\nratio of step times to equal weighting of the same framework (median over rounds):\n")
        overview = harness.Table(["contender"] + [f"{t} tasks" for t in counts], "l" + "r" * len(counts))
        for name, by_tasks in summary.items():
            if name in (TORCH_EQUAL, KMTL_EQUAL):
                continue
            overview.row(name, *(harness.ratio(by_tasks.get(t)) for t in counts))
        if errors:
            print("\ncould not run:" + "".join(f"\n  {e}" for e in errors))


if __name__ == "__main__":
    main()
