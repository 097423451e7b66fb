"""Correlation sweep: does sharing help more as two tasks grow more related? (Ma et al. 2018, section 3)

Two synthetic regression tasks (`kmtl.data.synthetic_tasks`, input_dim 100 and
the other defaults: 10 sinusoids, noise 0.1) whose weight vectors have cosine p,
for p in `--correlations`. For every p and seed: the seed draws the task pair
(`task_seed`), the training and test inputs and the initialisation; four models
are trained on the same budget and scored on the test set:

- single-task: one model per task, the same trunk and head as below;
- hard sharing: `kmtl.build_model` (default architecture), one trunk for both;
- MMoE: `architecture="mmoe"` with `--experts` copies of the trunk.

Trunk `dense(--units)`, heads `Regression(hidden_units=(--tower,))`, Adam (lr
`--lr`), batch `--batch-size`. **Budget**: at most `--epochs` epochs with early
stopping on a validation split held out of the training set (the last 10%:
`val_loss`, patience `--patience`, best weights restored), so every model gets
the number of epochs that suits it; the test set is only scored.

The table gives, per p: the test MSE (mean of the two tasks; mean ± std over
seeds) of each model, the relative gain of each multi-task model over the
single-task models (`-Δm` on the MSE, `kmtl.delta.delta_m`, computed per seed;
positive = sharing helped), and the label correlation measured on the training
set (`label_correlation`) beside the one expected (`expected_label_correlation`).
It is written to `benchmarks/results/correlation_sweep/table.md`, the figure
(MSE vs p with the seed spread, and the gains) to `sweep.png` there.

    nice -n 10 python benchmarks/correlation_sweep.py [--seeds 0,1,2] [--train 8000] [--test 2000]
"""

import argparse
import os
import statistics
import sys
import time

import keras
import numpy as np

import kmtl
from kmtl import data, heads, trunks

try:
    import _harness as harness
except ImportError:  # run as `python -m benchmarks.correlation_sweep`
    from benchmarks import _harness as harness

MODELS = ("single-task", "hard sharing", "MMoE")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "correlation_sweep")


def task_heads(tower):
    return [heads.Regression(name, hidden_units=(tower,)) for name in data.synthetic_task_names(2)]


def train_and_score(task_list, architecture, options, train, test, args, seed):
    """Trains one model on `train` (early stopping on its last 10%) and returns `{task: test MSE}`."""
    keras.utils.set_random_seed(seed)
    model = kmtl.build_model(
        heads=task_list,
        trunk=trunks.dense(tuple(args.units)),
        input_shape=(train[0].shape[1],),
        architecture=architecture,
        **options,
    )
    model.compile(optimizer=keras.optimizers.Adam(args.lr))
    names = [h.name for h in task_list]
    x, y = train[0], {t: train[1][t] for t in names}
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=args.patience, restore_best_weights=True
    )
    history = model.fit(
        x,
        y,
        validation_split=0.1,
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[stop],
        verbose=0,
    )
    predictions = model.predict(test[0], batch_size=1024, verbose=0)
    mse = {t: float(np.mean((np.ravel(predictions[t]) - test[1][t]) ** 2)) for t in names}
    return mse, len(history.history["loss"]), int(model.count_params())


def run_seed(p, seed, args):
    train = data.synthetic_tasks(2, p, args.train, input_dim=100, seed=seed, task_seed=seed)
    test = data.synthetic_tasks(2, p, args.test, input_dim=100, seed=10_000 + seed, task_seed=seed)
    task_list = task_heads(args.tower)
    single, epochs, params = {}, [], {}
    for head in task_list:
        mse, used, count = train_and_score([head], "hard_sharing", {}, train, test, args, seed)
        single.update(mse)
        epochs.append(used)
        params["single-task"] = params.get("single-task", 0) + count
    scores = {"single-task": single}
    for name, architecture, options in (
        ("hard sharing", "hard_sharing", {}),
        ("MMoE", "mmoe", {"num_experts": args.experts}),
    ):
        scores[name], used, params[name] = train_and_score(
            task_list, architecture, options, train, test, args, seed
        )
        epochs.append(used)
    gains = {}
    for name in MODELS[1:]:
        change = kmtl.delta.delta_m(
            {t: {"mse": v} for t, v in scores[name].items()}, {t: {"mse": v} for t, v in single.items()}
        )
        gains[name] = -change.delta_m
    measured = data.label_correlation(train[1])[("task_0", "task_1")]
    expected = data.expected_label_correlation(p, task_seed=seed)
    return {
        "mse": {name: statistics.fmean(s.values()) for name, s in scores.items()},
        "gain": gains,
        "measured": measured,
        "expected": expected,
        "epochs": epochs,
        "params": params,
    }


def spread(values, digits=3):
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def plot(rows, correlations, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, name in enumerate(MODELS):
        values = np.array([[r["mse"][name] for r in rows[p]] for p in correlations])
        mean, std = values.mean(axis=1), values.std(axis=1)
        left.plot(correlations, mean, marker="o", color=f"C{k}", label=name)
        left.fill_between(correlations, mean - std, mean + std, color=f"C{k}", alpha=0.2)
        if k:
            gains = np.array([[r["gain"][name] for r in rows[p]] for p in correlations])
            g_mean, g_std = gains.mean(axis=1), gains.std(axis=1)
            right.plot(correlations, g_mean, marker="o", color=f"C{k}", label=name)
            right.fill_between(correlations, g_mean - g_std, g_mean + g_std, color=f"C{k}", alpha=0.2)
    left.set_xlabel("task weight cosine p")
    left.set_ylabel("test MSE (mean of the two tasks)")
    left.set_title("test MSE vs task correlation (mean ± std over seeds)")
    right.axhline(0.0, color="grey", linewidth=1)
    right.set_xlabel("task weight cosine p")
    right.set_ylabel("gain over single-task (%, -Δm)")
    right.set_title("relative gain of sharing (positive = helped)")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--correlations", default="0,0.25,0.5,0.75,0.9,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20, help="at most, with early stopping")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--units", type=int, nargs="+", default=[32])
    parser.add_argument("--tower", type=int, default=16)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    correlations = [float(p) for p in args.correlations.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    rows = {}
    for p in correlations:
        rows[p] = []
        for seed in seeds:
            rows[p].append(run_seed(p, seed, args))
            print(
                f"[p={p:g} seed {seed}] {time.perf_counter() - started:.0f} s, epochs {rows[p][-1]['epochs']}",
                file=sys.stderr,
                flush=True,
            )
    wall = time.perf_counter() - started
    lines = [
        f"Correlation sweep (Ma et al. 2018 synthetic tasks): 2 tasks, input_dim 100, "
        f"train {args.train} (10% of it for early stopping) / test {args.test}, seeds {seeds}; "
        f"trunk dense{tuple(args.units)}, tower {args.tower}, MMoE {args.experts} experts, Adam lr {args.lr}, "
        f"batch {args.batch_size}, <= {args.epochs} epochs (patience {args.patience}).",
        "",
        "| p | label corr. measured | expected | single-task MSE | hard sharing MSE | MMoE MSE "
        "| hard sharing gain (%) | MMoE gain (%) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in correlations:
        seed_rows = rows[p]
        lines.append(
            f"| {p:g} | {spread([r['measured'] for r in seed_rows])} | {spread([r['expected'] for r in seed_rows])} | "
            + " | ".join(spread([r["mse"][name] for r in seed_rows]) for name in MODELS)
            + " | "
            + " | ".join(spread([r["gain"][name] for r in seed_rows], 1) for name in MODELS[1:])
            + " |"
        )
    params = rows[correlations[0]][0]["params"]
    epochs = [e for p in correlations for r in rows[p] for e in r["epochs"]]
    lines += [
        "",
        "MSE: mean over the two tasks, then mean ± std over seeds. Gain: -Δm of the MSE against the single-task "
        "models of the same seed (positive = sharing helped), mean ± std over seeds. Parameters: "
        + ", ".join(f"{name} {count:,}" for name, count in params.items())
        + f" (single-task: both models). Epochs used (early stopping): {min(epochs)}-{max(epochs)}, "
        f"median {statistics.median(epochs):g}.",
        "",
        f"{harness.machine_line()}, {harness.framework_versions()}; load average at end {harness.load_line()}; "
        f"wall time {wall:.0f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, correlations, os.path.join(args.out, "sweep.png"))
    print(f"written to {args.out}/table.md and sweep.png")


if __name__ == "__main__":
    main()
