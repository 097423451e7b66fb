"""Shared machinery of kmtl's benchmarks: alternating timers, ratio tables, tree workers.

A *contender* is one thing to time. `warmup()` runs once before the rounds
(building, tracing, filling caches: never part of the results, its wall time
is kept as `warmup_seconds`); `measure()` runs one block of work and returns
its seconds per unit (per step, per example: the script decides). The
contenders of a group are measured in interleaved rounds: every round
measures one block of every contender, starting from a different contender
each round (`--order rotate`), so slow drifts of the machine's load hit all
of them alike. Results give the min and median over rounds and ratios of
medians to a named baseline.

Contenders can live in other processes. A `Worker` is one long-lived
subprocess (TensorFlow is imported once) that loads a benchmark script and
answers JSON requests on its stdin/stdout: `build` (calls the script's
`build_contender(spec)` and the contender's warm-up), `measure` (one block),
`call` (any function of the script, e.g. to list contenders), `drop` (frees
a contender) and `quit`.
Given a PYTHONPATH, a worker imports `kmtl` from that tree, which is how one
run compares two code trees (`--trees old=/tmp/kmtl_old,new=/work/main`): the
benchmark code is this checkout's, only the imported `kmtl` differs, and
the workers measure in turn (one block each), never at the same time.
`LocalWorker` serves the same requests in this process.

Typical script::

    def build_contender(spec) -> harness.Contender: ...

    def main():
        parser = argparse.ArgumentParser()
        harness.add_arguments(parser, repeats=5, steps=10, trees=True)
        args = parser.parse_args()
        with harness.Session(args, title="...") as session:
            workers = session.workers(sys.modules[__name__])  # local, or one per tree
            contenders = [session.remote(w, f"x [{w.label}]", spec) for w in workers]
            results = session.alternate(contenders, group="...")
            table = harness.Table(["contender", "median (ms)", "ratio"])
            for r in results.values():
                table.row(r.name, harness.ms(r.median), harness.ratio(results.ratio(r.name, "x")))

Run `python benchmarks/_harness.py --worker SCRIPT` only through `Worker`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

HARNESS = os.path.abspath(__file__)


# --- contenders and results ----------------------------------------------------------------------
@dataclass
class Contender:
    """One thing to time: `measure()` returns seconds per unit for one block of work."""

    name: str
    measure: Callable[[], float]
    warmup: Callable[[], Any] | None = None
    #: Facts to print beside the times (parameter counts, memory, ...), JSON-able.
    info: dict = field(default_factory=dict)
    #: Frees what the contender holds (a remote model) once its group is measured.
    release: Callable[[], Any] | None = None


@dataclass
class Result:
    name: str
    samples: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    warmup_seconds: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def min(self) -> float | None:
        return min(self.samples) if self.samples else None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "samples": self.samples,
            "median": self.median,
            "min": self.min,
            "warmup_seconds": self.warmup_seconds,
            "info": self.info,
            "error": self.error,
        }


class Results(dict):
    """`{name: Result}` in the order the contenders were given."""

    def ratio(self, name: str, baseline: str) -> float | None:
        """Median of `name` over median of `baseline` (None if either is missing)."""
        a, b = self.get(name), self.get(baseline)
        if a is None or b is None or not a.ok or not b.ok or not b.median:
            return None
        return a.median / b.median

    def min_ratio(self, name: str, baseline: str) -> float | None:
        a, b = self.get(name), self.get(baseline)
        if a is None or b is None or not a.ok or not b.ok or not b.min:
            return None
        return a.min / b.min


def first_line(error: BaseException | str) -> str:
    """The last non-empty line of an error or a traceback (what a table cell can hold)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "error"


def alternate(
    contenders: Sequence[Contender],
    rounds: int,
    warmup_rounds: int = 0,
    order: str = "rotate",
    progress=sys.stderr,
) -> Results:
    """Warms every contender up, then measures them in interleaved rounds.

    A contender whose warm-up or measurement raises is reported with its error
    and left out of the later rounds; the others go on. `warmup_rounds` more
    rounds run first and are discarded.
    """
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"Contender names must be unique. Received: {names}")
    results = Results((c.name, Result(c.name, info=dict(c.info))) for c in contenders)
    live = []
    for c in contenders:
        start = time.perf_counter()
        try:
            if c.warmup is not None:
                extra = c.warmup()
                if isinstance(extra, dict):
                    results[c.name].info.update(extra)
            results[c.name].info.update(c.info)
            live.append(c)
        except Exception as error:  # noqa: BLE001 - reported in the table, the run goes on
            results[c.name].error = first_line(error)
            _log(progress, f"[warm-up] {c.name}: FAILED {first_line(error)}")
            continue
        results[c.name].warmup_seconds = time.perf_counter() - start
        _log(progress, f"[warm-up] {c.name}: {results[c.name].warmup_seconds:.1f} s")
    total = warmup_rounds + rounds
    for r in range(total):
        if not live:
            break
        shift = r % len(live) if order == "rotate" else 0
        cells = []
        for c in live[shift:] + live[:shift]:
            try:
                seconds = float(c.measure())
            except Exception as error:  # noqa: BLE001
                results[c.name].error = first_line(error)
                cells.append(f"{c.name}: FAILED {first_line(error)}")
                continue
            if r >= warmup_rounds:
                results[c.name].samples.append(seconds)
            cells.append(f"{c.name}: {seconds * 1000:.4g} ms")
        live = [c for c in live if results[c.name].error is None]
        label = (
            f"discarded {r + 1}/{warmup_rounds}" if r < warmup_rounds else f"{r + 1 - warmup_rounds}/{rounds}"
        )
        _log(progress, f"[round {label}] " + "; ".join(cells))
    return results


def _log(stream, text):
    if stream is not None:
        print(text, file=stream, flush=True)


# --- formatting ----------------------------------------------------------------------------------
def ms(seconds: float | None, digits: int = 1) -> str:
    return "" if seconds is None else f"{1000 * seconds:.{digits}f}"


def ratio(value: float | None, digits: int = 2, suffix: str = "x") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def mib(num_bytes: float | None, digits: int = 1) -> str:
    return "" if num_bytes is None else f"{num_bytes / 2**20:,.{digits}f}"


class Table:
    """A markdown table printed row by row (each row is flushed as soon as it is known)."""

    def __init__(self, columns: Sequence[str], align: str | Sequence[str] = "", stream=None):
        self.columns = list(columns)
        align = list(align) if align else ["l"] * len(self.columns)
        if len(align) != len(self.columns):
            raise ValueError(f"One alignment per column. Received: {align} for {self.columns}")
        self.align = align
        self.stream = stream
        self._started = False

    def header(self):
        if not self._started:
            self._started = True
            rules = {"l": "---", "r": "---:", "c": ":---:"}
            self._print("| " + " | ".join(self.columns) + " |")
            self._print("|" + "|".join(rules[a] for a in self.align) + "|")

    def row(self, *cells):
        if len(cells) != len(self.columns):
            raise ValueError(f"Expected {len(self.columns)} cells, got {len(cells)}: {cells}")
        self.header()
        self._print("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")

    def _print(self, text):
        print(text, file=self.stream or sys.stdout, flush=True)


# --- command line ----------------------------------------------------------------------------
def add_arguments(
    parser: argparse.ArgumentParser, *, repeats: int = 5, steps: int | None = None, trees=False
):
    """The options every benchmark shares.

    `--repeats` (alias `--rounds`): measured rounds per contender;
    `--warmup-rounds`: extra rounds run first and discarded; `--order`;
    `--json`: also write every sample to a file; `--steps` (if `steps` is
    given): steps per measured block; `--trees` (if `trees`): compare code
    trees in one run.
    """
    group = parser.add_argument_group("measurement (benchmarks/_harness.py)")
    group.add_argument(
        "--repeats",
        "--rounds",
        dest="repeats",
        type=int,
        default=repeats,
        help="measured rounds per contender",
    )
    if steps is not None:
        group.add_argument("--steps", type=int, default=steps, help="steps per measured block")
    group.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="rounds run first and discarded (default 1: a retrace or a cold cache in a contender's "
        "first block is not measured)",
    )
    group.add_argument(
        "--order",
        choices=("rotate", "fixed"),
        default="rotate",
        help="rotate: each round starts from the next contender (default); fixed: always the same order",
    )
    group.add_argument("--json", metavar="PATH", help="also write every sample and fact to this JSON file")
    if trees:
        group.add_argument(
            "--trees",
            type=parse_trees,
            default=None,
            metavar="LABEL=PATH,...",
            help="measure each kmtl tree in its own worker process in the same run, "
            "e.g. old=/tmp/kmtl_old,new=/work/main (the first is the reference of the ratio column)",
        )
    return parser


def parse_trees(text: str) -> dict[str, str]:
    """`"old=/tmp/kmtl_old,new=/work/main"` -> `{"old": "/tmp/kmtl_old", "new": "/work/main"}`."""
    trees = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {item!r}")
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(os.path.join(path, "kmtl", "__init__.py")):
            raise argparse.ArgumentTypeError(f"{path} has no kmtl/__init__.py")
        if label in trees:
            raise argparse.ArgumentTypeError(f"tree label {label!r} given twice")
        trees[label] = path
    if not trees:
        raise argparse.ArgumentTypeError("no tree given")
    return trees


def machine_line() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores, python {platform.python_version()}, {platform.machine()}"


def load_line() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def framework_versions(names: Sequence[str] = ("tensorflow", "keras")) -> str:
    """Installed versions of these distributions, read from their metadata (nothing is imported).

    "tensorflow" also matches the `tensorflow-cpu` and `tensorflow-gpu` wheels.
    """
    from importlib import metadata

    found = []
    for name in names:
        candidates = [name] + ([f"{name}-cpu", f"{name}-gpu"] if name == "tensorflow" else [])
        for candidate in candidates:
            try:
                found.append(f"{name} {metadata.version(candidate)}")
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


# --- workers ---------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


class LocalWorker:
    """Serves worker requests in this process, from a script module's functions."""

    def __init__(self, module, label: str | None = None):
        self.module = module
        self.label = label
        self.tree = None
        self.contenders: dict[str, Contender] = {}
        self.hello = {"pid": os.getpid(), "local": True}

    def build(self, name: str, spec: dict) -> dict:
        contender = self.module.build_contender(spec)
        extra = contender.warmup() if contender.warmup is not None else None
        self.contenders[name] = contender
        info = dict(contender.info)
        if isinstance(extra, dict):
            info.update(extra)
        return info

    def measure(self, name: str) -> float:
        return float(self.contenders[name].measure())

    def call(self, function: str, *args):
        return getattr(self.module, function)(*args)

    def drop(self, name: str):
        self.contenders.pop(name, None)

    def close(self):
        self.contenders.clear()


class Worker:
    """A long-lived subprocess that runs `script`'s contenders on request.

    Args:
        label: a short name ("old", "torch", ...), used in messages.
        script: path of the benchmark script whose `build_contender(spec)`
            and other functions the worker serves.
        tree: a directory holding `kmtl/`; put first on the worker's
            PYTHONPATH, and checked against the `kmtl` the worker imports.
        env: more environment variables for the worker.
    """

    def __init__(self, label: str, script: str, tree: str | None = None, env: dict | None = None):
        self.label = label
        self.tree = os.path.realpath(tree) if tree else None
        child_env = dict(os.environ)
        child_env.update(env or {})
        if self.tree:
            rest = child_env.get("PYTHONPATH")
            child_env["PYTHONPATH"] = self.tree + (os.pathsep + rest if rest else "")
            child_env["KMTL_BENCHMARK_TREE"] = self.tree
        self.process = subprocess.Popen(
            [sys.executable, HARNESS, "--worker", os.path.abspath(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=child_env,
        )
        self._hello = None

    @property
    def hello(self) -> dict:
        if self._hello is None:
            self._hello = self._read()
        return self._hello

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.poll()
            raise WorkerError(f"worker {self.label!r} exited (code {code}); see its messages above")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(f"worker {self.label!r}: {reply.get('error', 'error')}")
        return reply

    def request(self, op: str, **fields) -> dict:
        self.hello  # noqa: B018 - wait for the worker's start-up first
        if self.process.poll() is not None:
            raise WorkerError(f"worker {self.label!r} exited (code {self.process.returncode})")
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def build(self, name: str, spec: dict) -> dict:
        reply = self.request("build", name=name, spec=spec)
        path = reply.get("kmtl")
        if self.tree and path and not os.path.realpath(path).startswith(self.tree + os.sep):
            raise WorkerError(f"worker {self.label!r} imported kmtl from {path}, not from {self.tree}")
        if reply.get("foreign"):
            raise WorkerError(f"worker {self.label!r} mixed trees: {reply['foreign']}")
        return reply["info"]

    def measure(self, name: str) -> float:
        return float(self.request("measure", name=name)["seconds"])

    def call(self, function: str, *args):
        return self.request("call", function=function, args=list(args))["result"]

    def drop(self, name: str):
        self.request("drop", name=name)

    def close(self, timeout: float = 30):
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.stdin.close()
                self.process.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def remote(worker, name: str, spec: dict, info: dict | None = None) -> Contender:
    """A contender built and measured by `worker` (a `Worker` or a `LocalWorker`)."""
    return Contender(
        name=name,
        measure=lambda: worker.measure(name),
        warmup=lambda: worker.build(name, spec),
        info=dict(info or {}),
        release=lambda: worker.drop(name),
    )


def _is_editable_kmtl_finder(finder) -> bool:
    return str(getattr(finder, "__module__", "")).startswith("__editable___kmtl")


def _foreign_kmtl_modules(kmtl_file: str | None) -> list[str]:
    """`kmtl.*` modules loaded from outside the directory of `kmtl/__init__.py`."""
    if not kmtl_file:
        return []
    root = os.path.dirname(os.path.realpath(kmtl_file)) + os.sep
    return sorted(
        f"{name} ({module.__file__})"
        for name, module in list(sys.modules.items())
        if name.startswith("kmtl.")
        and getattr(module, "__file__", None)
        and not os.path.realpath(module.__file__).startswith(root)
    )


def _worker_main(script: str):
    """The worker's loop: one JSON request per stdin line, one JSON reply per stdout line."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the protocol

    def send(message):
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    if os.environ.get("KMTL_BENCHMARK_TREE"):
        # An editable install of kmtl adds a finder that would serve `kmtl.x` from its own
        # checkout whenever the tree on PYTHONPATH lacks `x`: drop it, so a tree is all or nothing.
        sys.meta_path[:] = [f for f in sys.meta_path if not _is_editable_kmtl_finder(f)]
    try:
        spec = importlib.util.spec_from_file_location("_benchmark_script", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules["_benchmark_script"] = module
        spec.loader.exec_module(module)
    except BaseException:  # noqa: BLE001
        send({"ok": False, "error": traceback.format_exc()})
        return
    worker = LocalWorker(module)
    send({"ok": True, "pid": os.getpid(), "python": platform.python_version()})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "quit":
                break
            if op == "build":
                info = worker.build(request["name"], request["spec"])
                kmtl = sys.modules.get("kmtl")
                path = getattr(kmtl, "__file__", None)
                send({"ok": True, "info": info, "kmtl": path, "foreign": _foreign_kmtl_modules(path)})
            elif op == "measure":
                send({"ok": True, "seconds": worker.measure(request["name"])})
            elif op == "call":
                send({"ok": True, "result": worker.call(request["function"], *request.get("args", []))})
            elif op == "drop":
                worker.drop(request["name"])
                send({"ok": True})
            else:
                send({"ok": False, "error": f"unknown op {op!r}"})
        except Exception:  # noqa: BLE001 - the parent reports it and goes on
            send({"ok": False, "error": traceback.format_exc()})


# --- a run -----------------------------------------------------------------------------------------
class Session:
    """One benchmark run: prints its context, alternates groups, records, closes its workers.

    Args:
        args: the parsed command line (with `add_arguments`' options).
        title: one line saying what is measured.
        versions: the distributions whose installed versions to print.
    """

    def __init__(self, args, title: str = "", versions: Sequence[str] = ("tensorflow", "keras")):
        self.args = args
        self.started = time.perf_counter()
        self.records: list[dict] = []
        self._workers: list = []
        print(f"command: python {' '.join(sys.argv)}")
        print(f"date: {datetime.datetime.now().isoformat(timespec='minutes')}, {machine_line()}")
        if versions:
            print(framework_versions(versions))
        print(f"load average at start: {load_line()}")
        if title:
            print(title)
        order = "rotating start" if args.order == "rotate" else "fixed order"
        warm = f", {args.warmup_rounds} discarded rounds first" if args.warmup_rounds else ""
        print(f"{args.repeats} interleaved rounds ({order}{warm}); warm-up excluded")
        print(flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def worker(self, label: str, script: str, tree: str | None = None, env: dict | None = None) -> Worker:
        w = Worker(label, script, tree=tree, env=env)
        self._workers.append(w)
        return w

    def workers(self, module, trees: dict | None = None) -> list:
        """One `Worker` per tree of `trees` (default `--trees`), or a `LocalWorker` for this process."""
        trees = getattr(self.args, "trees", None) if trees is None else trees
        if not trees:
            return [LocalWorker(module)]
        script = module.__file__
        started = [self.worker(label, script, tree=path) for label, path in trees.items()]
        for w in started:
            print(f"worker {w.label}: pid {w.hello['pid']}, kmtl from {w.tree}", flush=True)
        return started

    def close_worker(self, worker):
        worker.close()
        if worker in self._workers:
            self._workers.remove(worker)

    def remote(self, worker, name: str, spec: dict, info: dict | None = None) -> Contender:
        return remote(worker, name, spec, info)

    def alternate(
        self,
        contenders: Sequence[Contender],
        group: str = "",
        rounds: int | None = None,
        release: bool = True,
    ) -> Results:
        """`alternate()` with the command line's options; records the group and then releases
        the contenders (`release=False` keeps them, e.g. to measure them again)."""
        if group:
            print(f"[{group}] {len(contenders)} contenders", file=sys.stderr, flush=True)
        results = alternate(
            contenders,
            rounds=self.args.repeats if rounds is None else rounds,
            warmup_rounds=self.args.warmup_rounds,
            order=self.args.order,
        )
        self.records.append({"group": group, "results": [r.as_dict() for r in results.values()]})
        if release:
            for c in contenders:
                if c.release is not None:
                    try:
                        c.release()
                    except Exception as error:  # noqa: BLE001 - a dead worker was reported already
                        _log(sys.stderr, f"[release] {c.name}: {first_line(error)}")
        return results

    def record(self, group: str, **facts):
        """Keeps facts that are not timings (e.g. a memory reading) for `--json`."""
        self.records.append({"group": group, **facts})

    def close(self):
        for w in list(self._workers):
            w.close()
        self._workers.clear()
        print()
        print(f"load average at end: {load_line()}; wall time {time.perf_counter() - self.started:.0f} s")
        if getattr(self.args, "json", None):
            with open(self.args.json, "w") as f:
                json.dump({"command": sys.argv, "records": self.records}, f, indent=1)
            print(f"samples written to {self.args.json}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit(
            "benchmarks/_harness.py is a library (and a worker: --worker SCRIPT); run a benchmark script"
        )
