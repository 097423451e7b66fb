"""Test R^2 of `kmtl.sklearn.MultiTaskEstimator` beside scikit-learn's multi-output regressors.

Data:

* `kmtl.data.synthetic_tasks` (Ma et al. 2018): 2 regression tasks whose weight
  vectors have cosine 0.0, 0.5, 0.9, 1.0; `--train` training and `--test` test
  examples (same `task_seed`, different `seed`), `--input-dim` features. The
  training draw changes with the seed of the run.
* `sklearn.datasets.load_linnerud`: 20 rows, 3 features, 3 targets (Weight,
  Waist, Pulse); 5-fold shuffled cross-validation (`KFold(5, shuffle=True,
  random_state=seed)`), R^2 per target of the pooled out-of-fold predictions
  (`cross_val_predict`: 4 test rows per fold are too few for an R^2 each).

Contenders, all with the same shared hidden layers (`--hidden`), Adam at
learning rate 1e-3, `--batch` examples per step and `--epochs` passes:

* `kmtl hard sharing`: `MultiTaskEstimator` (one network, one head per task);
* `kmtl per task`: `MultiOutputRegressor(MultiTaskEstimator)`, one network per target;
* `MLPRegressor`: scikit-learn's MLP on all targets at once: its hidden layers
  are shared, so it is a hard-sharing network too (one linear output per target);
* `MultiOutputRegressor(MLP)`: one `MLPRegressor` per target;
* `RegressorChain(MLP)`: one `MLPRegressor` per target, each also reading the
  previous targets' predictions;
* `Ridge` (alpha 1.0): the linear baseline.

`MultiTaskEstimator` standardizes X and the targets itself; every scikit-learn
contender gets the same: `TransformedTargetRegressor(make_pipeline(StandardScaler(),
model), transformer=StandardScaler())`. scikit-learn's MLPs keep their other
defaults (L2 `alpha=1e-4`, stop when the training loss stalls for 10 epochs).
Each cell is the mean ± standard deviation over the seeds; `fit s` is the mean
wall time of one fit (on linnerud, of the 5 fold fits together).

    nice -n 10 python benchmarks/sklearn_comparison.py [--seeds 3] [--epochs 20] [--train 4000]
        [--test 2000] [--input-dim 20] [--out benchmarks/results/sklearn_comparison.md]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings

import numpy as np

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.sklearn_comparison`
    from benchmarks import _harness as harness

CORRELATIONS = (0.0, 0.5, 0.9, 1.0)
CONTENDERS = (
    "kmtl hard sharing",
    "kmtl per task",
    "MLPRegressor",
    "MultiOutputRegressor(MLP)",
    "RegressorChain(MLP)",
    "Ridge",
)


def contender(name: str, seed: int, args, batch_size: int, epochs: int):
    """A fresh unfitted regressor of that name."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.linear_model import Ridge
    from sklearn.multioutput import MultiOutputRegressor, RegressorChain
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kmtl.sklearn import MultiTaskEstimator

    hidden = tuple(args.hidden)
    if name.startswith("kmtl"):
        estimator = MultiTaskEstimator(
            hidden_units=hidden, epochs=epochs, batch_size=batch_size, learning_rate=1e-3, random_state=seed
        )
        return estimator if name == "kmtl hard sharing" else MultiOutputRegressor(estimator)

    def mlp():
        return MLPRegressor(
            hidden_layer_sizes=hidden,
            learning_rate_init=1e-3,
            batch_size=batch_size,
            max_iter=epochs,
            random_state=seed,
        )

    model = {
        "MLPRegressor": mlp,
        "MultiOutputRegressor(MLP)": lambda: MultiOutputRegressor(mlp()),
        "RegressorChain(MLP)": lambda: RegressorChain(mlp(), random_state=seed),
        "Ridge": lambda: Ridge(alpha=1.0),
    }[name]()
    return TransformedTargetRegressor(
        make_pipeline(StandardScaler(), model), transformer=StandardScaler(), check_inverse=False
    )


def r2_per_target(y_true, y_pred) -> list[float]:
    from sklearn.metrics import r2_score

    return list(r2_score(y_true, y_pred, multioutput="raw_values"))


def run_synthetic(correlation: float, seed: int, args) -> dict:
    """`{contender: (test R^2 per task, fit seconds)}` on one draw of the synthetic tasks."""
    from kmtl.data import synthetic_tasks

    x, y = synthetic_tasks(2, correlation, args.train, args.input_dim, seed=seed + 1)
    x_test, y_test = synthetic_tasks(2, correlation, args.test, args.input_dim, seed=10_000 + seed)
    y, y_test = np.column_stack(list(y.values())), np.column_stack(list(y_test.values()))
    results = {}
    for name in CONTENDERS:
        model = contender(name, seed, args, args.batch, args.epochs)
        start = time.perf_counter()
        model.fit(x, y)
        seconds = time.perf_counter() - start
        results[name] = (r2_per_target(y_test, model.predict(x_test)), seconds)
        print(f"[synthetic p={correlation} seed={seed}] {name}: {results[name]}", file=sys.stderr, flush=True)
    return results


def run_linnerud(seed: int, args) -> dict:
    """`{contender: (out-of-fold R^2 per target, seconds of the 5 fold fits)}` on linnerud."""
    from sklearn.datasets import load_linnerud
    from sklearn.model_selection import KFold, cross_val_predict

    data = load_linnerud()
    folds = KFold(5, shuffle=True, random_state=seed)
    results = {}
    for name in CONTENDERS:
        model = contender(name, seed, args, args.linnerud_batch, args.linnerud_epochs)
        start = time.perf_counter()
        prediction = cross_val_predict(model, data.data, data.target, cv=folds)
        seconds = time.perf_counter() - start
        results[name] = (r2_per_target(data.target, prediction), seconds)
        print(f"[linnerud seed={seed}] {name}: {results[name]}", file=sys.stderr, flush=True)
    return results


def cell(values) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(runs: list[dict], targets: list[str], label: str, stream) -> None:
    """One markdown row per contender: R^2 mean ± std over the runs, then the mean fit time."""
    columns = [label, *[f"{t} R²" for t in targets], "mean R²", "fit s"]
    out = harness.Table(columns, align="l" + "r" * (len(columns) - 1), stream=stream)
    for name in CONTENDERS:
        scores = np.array([run[name][0] for run in runs])  # (runs, targets)
        seconds = [run[name][1] for run in runs]
        out.row(
            name,
            *[cell(scores[:, t]) for t in range(len(targets))],
            cell(scores.mean(axis=1)),
            f"{np.mean(seconds):.1f}",
        )


class Tee(io.StringIO):
    """Prints to stdout and keeps a copy."""

    def write(self, text):
        sys.stdout.write(text)
        return super().write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--correlations", type=float, nargs="+", default=list(CORRELATIONS))
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--input-dim", type=int, default=20)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--linnerud-epochs", type=int, default=30)
    parser.add_argument("--linnerud-batch", type=int, default=4)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "sklearn_comparison.md")
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*Maximum iterations.*")  # MLPRegressor at max_iter

    out = Tee()
    started = time.perf_counter()
    print("# MultiTaskEstimator vs scikit-learn multi-output regressors\n", file=out)
    print(f"command: `python {' '.join(sys.argv)}`  ", file=out)
    print(
        f"{harness.machine_line()}; {harness.framework_versions(('tensorflow', 'keras', 'scikit-learn'))}  ",
        file=out,
    )
    print(f"load average at start: {harness.load_line()}  ", file=out)
    print(
        f"hidden {tuple(args.hidden)}, Adam 1e-3; synthetic: {args.epochs} epochs, batch {args.batch}; "
        f"linnerud: {args.linnerud_epochs} epochs, batch {args.linnerud_batch}; seeds 0..{args.seeds - 1}\n",
        file=out,
    )
    for correlation in args.correlations:
        runs = [run_synthetic(correlation, seed, args) for seed in range(args.seeds)]
        print(
            f"## synthetic tasks, cosine {correlation}: {args.train} train / {args.test} test, "
            f"input_dim {args.input_dim}, test R²\n",
            file=out,
        )
        table(runs, ["task_0", "task_1"], "model", out)
        print(file=out)
    runs = [run_linnerud(seed, args) for seed in range(args.seeds)]
    print("## linnerud (20 rows): 5-fold CV, R² of the pooled out-of-fold predictions\n", file=out)
    table(runs, ["Weight", "Waist", "Pulse"], "model", out)
    print(
        f"\nload average at end: {harness.load_line()}; wall time {time.perf_counter() - started:.0f} s",
        file=out,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as file:
        file.write(out.getvalue())
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
