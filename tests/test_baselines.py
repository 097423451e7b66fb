"""Single-task baselines, the static-weight sweep, the trade-off plot and TensorBoard logs.

One module fixture trains, for real on the bundled digits, the single-task
baselines and a three-point sweep (two seeds each, TensorBoard logs on),
while recording every split the data layer is asked for. The tests then
read what it wrote; the rules of the grid, the selection and the front are
checked on hand cases.
"""

import json
import struct

import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import baselines, evaluation, experiment, plots

CONFIG = {
    "dataset": "digits",
    "epochs": 2,
    "batch_size": 32,
    "train_limit": 400,
    "seeds": [0, 1],
    "verbose": 0,
    "name": "base",
    "tensorboard": True,
}


class _Recorder:
    """Wraps `kmtl.data.task_dataset`, recording each split (and scrambling test labels when asked)."""

    def __init__(self, original):
        self.original, self.splits, self.scramble_test = original, [], False

    def __call__(self, dataset, tasks, split="train", **kwargs):
        self.splits.append(split)
        pipeline = self.original(dataset, tasks, split=split, **kwargs)
        if self.scramble_test and split.startswith("test"):
            pipeline = pipeline.map(lambda x, y: (x, {k: tf.reverse(v, [0]) for k, v in y.items()}))
        return pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines")
    recorder = _Recorder(kmtl.data.task_dataset)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kmtl.data, "task_dataset", recorder)
        single = evaluation.single_task_baselines(CONFIG, out=out)
        after_single = len(recorder.splits)
        sweep = evaluation.static_weight_sweep(CONFIG, grid=4, test=False, out=out)
        sweep_splits = recorder.splits[after_single:]
        recorder.splits = []
        tested = evaluation.static_weight_sweep(CONFIG, grid=4, out=out)
        test_splits = list(recorder.splits)
    return {
        "out": out,
        "single": single,
        "sweep": sweep,
        "tested": tested,
        "sweep_splits": sweep_splits,
        "test_splits": test_splits,
        "recorder": recorder,
    }


def _no_training(*args, **kwargs):
    raise AssertionError("nothing should be trained: every run is cached")


def test_single_task_baselines_train_one_head_per_task_with_the_configs_budget(trained):
    single, out = trained["single"], trained["out"]
    assert list(single.results) == ["digit", "parity"]
    for task, result in single.results.items():
        assert result.run_dir == out / f"base-single-{task}"
        assert result.config["tasks"] == [task] and result.config["weighting"] is None
        assert result.config["epochs"] == 2 and result.config["seeds"] == [0, 1]
        assert sorted(result.per_seed) == [0, 1]
        model = kmtl.export.load_keras(result.run_dir / "seed-0" / "model.keras")
        assert model.task_names == [task]
        # A one-head model keeps the task prefix in its logs, so its report has the metrics.
        assert "accuracy" in single.mean[task] and single.std[task]["accuracy"] >= 0
        history = json.loads((result.run_dir / "seed-0" / "history.json").read_text())
        assert f"{task}_accuracy" in history and f"val_{task}_accuracy" in history
    assert single.mean["digit"]["accuracy"] > 0.3  # learned: 10 classes, chance 0.1
    assert "single-task baselines" in str(single)


def test_the_sweep_trains_every_candidate_with_its_fixed_weights_on_the_held_out_split(trained):
    sweep = trained["sweep"]
    assert sweep.weights == [
        {"digit": 0.5, "parity": 1.5},
        {"digit": 1.0, "parity": 1.0},
        {"digit": 1.5, "parity": 0.5},
    ]
    assert sweep.splits == {"train": "train[:360]", "validation": "train[360:400]"}
    for vector, result in zip(sweep.weights, sweep.results):
        assert result.config["loss_weights"] == vector and result.config["weighting"] is None
        assert result.config["train_split"] == "train[:360]"
        assert result.config["validation"] == result.config["test_split"] == "train[360:400]"
    assert sweep.test is None and sweep.chosen_test is None
    assert sweep.chosen == int(np.argmin(sweep.scores))
    assert sweep.validation[sweep.chosen] == sweep.results[sweep.chosen].mean


def test_the_sweep_never_reads_the_test_split_to_train_or_choose(trained):
    assert trained["sweep_splits"], "the recorder saw no split"
    assert not [s for s in trained["sweep_splits"] if s.startswith("test")], trained["sweep_splits"]
    assert set(trained["sweep_splits"]) == {"train[:360]", "train[360:400]"}
    # With test=True the candidates are cached: the new reads are the test split (after the
    # choice) and the refit of the chosen weights on all 400 training examples.
    assert set(trained["test_splits"]) == {"test", "train[:400]", "train[360:400]"}
    refit = trained["tested"].refit
    assert refit.run_dir.name == "base-static-refit" and refit.config["train_split"] is None
    assert (
        refit.config["loss_weights"] == trained["tested"].chosen_weights
        and refit.config["train_limit"] == 400
    )
    assert trained["sweep"].refit is None
    assert trained["tested"].chosen == trained["sweep"].chosen
    assert trained["tested"].scores == trained["sweep"].scores


def test_the_choice_does_not_change_when_the_test_labels_do(trained, monkeypatch, tmp_path):
    recorder = trained["recorder"]
    monkeypatch.setattr(kmtl.data, "task_dataset", recorder)
    monkeypatch.setattr(experiment, "train_run", _no_training)
    for result in trained["tested"].results:  # make the sweep evaluate on test again
        for cached in result.run_dir.glob("seed-*/test_metrics.json"):
            cached.rename(tmp_path / f"{result.run_dir.name}-{cached.parent.name}.json")
    recorder.scramble_test = True
    try:
        scrambled = evaluation.static_weight_sweep(CONFIG, grid=4, out=trained["out"])
    finally:
        recorder.scramble_test = False
        for result in trained["tested"].results:
            for seed in result.per_seed:
                saved = tmp_path / f"{result.run_dir.name}-seed-{seed}.json"
                saved.replace(result.run_dir / f"seed-{seed}" / "test_metrics.json")
    assert scrambled.test != trained["tested"].test  # the test labels changed the test scores...
    assert scrambled.chosen == trained["tested"].chosen  # ...but not the choice
    assert scrambled.scores == trained["tested"].scores


def test_repeated_baselines_and_sweeps_train_nothing(trained, monkeypatch, capsys):
    monkeypatch.setattr(experiment, "train_run", _no_training)
    again = evaluation.single_task_baselines(CONFIG, out=trained["out"])
    sweep = evaluation.static_weight_sweep(CONFIG, grid=4, out=trained["out"])
    assert all(r.from_cache for r in again.results.values()) and all(r.from_cache for r in sweep.results)
    assert again.mean == trained["single"].mean and sweep.test == trained["tested"].test
    printed = capsys.readouterr().out
    assert printed.count("reusing the cached experiment") == 6  # 2 single-task, 3 candidates, the refit
    assert "kmtl: static-weight sweep [3/3]" in printed and "about" in printed


def test_delta_m_of_the_chosen_weights_against_the_baselines(trained):
    tested, single = trained["tested"], trained["single"]
    metrics = {"digit": ["accuracy"], "parity": ["accuracy"]}
    delta = evaluation.delta_m(tested.chosen_test, single.mean, metrics=metrics)
    by_hand = np.mean(
        [
            -(tested.chosen_test[t]["accuracy"] - single.mean[t]["accuracy"])
            / single.mean[t]["accuracy"]
            * 100
            for t in metrics
        ]
    )
    assert delta.delta_m == pytest.approx(by_hand)


def test_tensorboard_logs_hold_task_losses_metrics_weights_and_cosines(trained):
    logs = trained["sweep"].results[0].run_dir / "seed-0" / "logs"
    tags = {}
    for kind in ("train", "validation"):
        files = list((logs / kind).glob("events.out.tfevents.*"))
        assert files, f"no {kind} event file in {logs}"
        tags[kind] = set()
        for path in files:
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                tags[kind] |= {value.tag for value in event.summary.value}
    for tag in (
        "epoch_digit_loss",
        "epoch_digit_accuracy",
        "epoch_parity_auc",
        "epoch_digit_weight",
        "epoch_loss",
    ):
        assert tag in tags["train"], (tag, sorted(tags["train"]))
    assert "epoch_cos_digit_parity" in tags["train"], sorted(tags["train"])
    assert {"epoch_digit_loss", "epoch_parity_accuracy"} <= tags["validation"]


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_tradeoff_plot_is_written_with_the_expected_size(trained, tmp_path):
    tested, single = trained["tested"], trained["single"]
    methods = {"equal": tested.results[1].mean, "digit-heavy": tested.results[2].mean}
    fig = plots.plot_tradeoff(
        methods,
        tasks=["digit", "parity"],
        spread={"equal": tested.results[1].std},
        single_task=single.mean,
        single_task_spread=single.std,
        sweep=tested,
        references={"paper": (0.9, 0.9)},
    )
    path = tmp_path / "tradeoff.png"
    fig.savefig(path, dpi=100)
    assert path.stat().st_size > 10_000 and _png_size(path) == (750, 480)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"equal", "digit-heavy", "single-task", "static front", "static, chosen on validation"} <= set(
        labels
    )
    with pytest.raises(ValueError, match="test=True"):
        plots.plot_tradeoff(methods, sweep=trained["sweep"])
    with pytest.raises(ValueError, match="exactly two tasks"):
        plots.plot_tradeoff(methods, tasks=["digit"])
    with pytest.raises(ValueError, match="'parity'"):
        plots.plot_tradeoff({"bad": {"digit": {"accuracy": 0.5}}}, tasks=["digit", "parity"])
    curves = tested.results[0].run_dir / "seed-0" / "curves.png"
    assert curves.stat().st_size > 10_000 and _png_size(curves)[0] > 400


# ----------------------------------------------------------------- hand cases


def test_simplex_grid_by_hand():
    assert baselines.simplex_grid(["a", "b"], 4) == [
        {"a": 0.5, "b": 1.5},
        {"a": 1.0, "b": 1.0},
        {"a": 1.5, "b": 0.5},
    ]
    three = baselines.simplex_grid(["a", "b", "c"], 4)
    assert three == [
        {"a": 0.75, "b": 0.75, "c": 1.5},
        {"a": 0.75, "b": 1.5, "c": 0.75},
        {"a": 1.5, "b": 0.75, "c": 0.75},
    ]
    assert len(baselines.simplex_grid(["a", "b", "c"], 6)) == 10
    for vector in baselines.simplex_grid(["a", "b", "c"], 6):
        assert sum(vector.values()) == pytest.approx(3.0) and min(vector.values()) > 0
    with pytest.raises(ValueError, match="at least two tasks"):
        baselines.simplex_grid(["a"], 4)
    with pytest.raises(ValueError, match=">= the number of tasks"):
        baselines.simplex_grid(["a", "b", "c"], 2)


def test_more_than_three_tasks_get_the_uniform_vector_and_seeded_dirichlet_draws():
    tasks = ["a", "b", "c", "d"]
    first = baselines._candidate_vectors(5, tasks, seed=3)
    assert first[0] == dict.fromkeys(tasks, 1.0) and len(first) == 5
    assert first == baselines._candidate_vectors(5, tasks, seed=3)
    assert first != baselines._candidate_vectors(5, tasks, seed=4)
    for vector in first:
        assert sum(vector.values()) == pytest.approx(4.0)
    assert len(baselines._candidate_vectors(None, tasks, seed=0)) == baselines.RANDOM_CANDIDATES


@pytest.mark.parametrize(
    "grid,message",
    [
        ([{"a": 1.0, "c": 1.0}], "must name exactly the tasks ['a', 'b']"),
        ([[1.0, 2.0, 3.0]], "a list of 2 weights"),
        ([{"a": -1.0, "b": 1.0}], "the weight of 'a' must be a finite number >= 0"),
        ([{"a": float("nan"), "b": 1.0}], "finite number"),
        ([{"a": True, "b": 1.0}], "finite number"),
        ([[0, 0]], "all zero"),
        ([[1, 2], [1.0, 2.0]], "more than once"),
        ([], "non-empty list"),
        ({"a": 1, "b": 1}, "non-empty list"),
    ],
)
def test_bad_grids_are_clear_errors(grid, message):
    with pytest.raises(ValueError) as info:
        baselines._candidate_vectors(grid, ["a", "b"], seed=0)
    assert message in str(info.value)


def test_validation_split_rules(tmp_path):
    config = experiment.load_config({"dataset": "digits", "train_limit": 1000})
    assert baselines._holdout_splits(config, 0.2) == ("train[:800]", "train[800:1000]")
    full = experiment.load_config({"dataset": "digits"})
    assert baselines._holdout_splits(full, 0.05) == ("train[:95%]", "train[95%:]")
    for bad in (0, 1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="fraction of the training examples"):
            baselines._holdout_splits(config, bad)
    with pytest.raises(ValueError, match="whole percentage"):
        baselines._holdout_splits(full, 0.123)
    with pytest.raises(ValueError, match="leaves no validation"):
        baselines._holdout_splits(experiment.load_config({"dataset": "digits", "train_limit": 3}), 0.1)
    with pytest.raises(ValueError, match="leave `train_split` unset"):
        evaluation.static_weight_sweep({"dataset": "digits", "train_split": "train[:100]"}, out=tmp_path)
    with pytest.raises(ValueError, match="at least two tasks"):
        evaluation.static_weight_sweep({"dataset": "digits", "tasks": ["digit"]}, out=tmp_path)
    with pytest.raises(ValueError, match="`selection` must be one of"):
        evaluation.static_weight_sweep({"dataset": "digits"}, selection="best", out=tmp_path)


def test_selection_scores_by_hand():
    rows = [
        {"a": {"accuracy": 0.9, "loss": 0.1}, "b": {"mae": 2.0}},
        {"a": {"accuracy": 0.8, "loss": 0.2}, "b": {"mae": 1.0}},
        {"a": {"accuracy": 0.6, "loss": 0.3}, "b": {"mae": 1.0}},
    ]
    # Δm against the best of each metric (accuracy 0.9, mae 1.0); loss is left out.
    expected = [np.mean([0.0, 100.0]), np.mean([100 * 0.1 / 0.9, 0.0]), np.mean([100 * 0.3 / 0.9, 0.0])]
    np.testing.assert_allclose(baselines._scores(rows, ["a", "b"], "delta_m"), expected)
    # Ranks: accuracy 1, 2, 3; mae 3, 1.5, 1.5 (tied).
    np.testing.assert_allclose(baselines._scores(rows, ["a", "b"], "mean_rank"), [2.0, 1.75, 2.25])


def test_pareto_front_by_hand():
    points = [[0.9, 0.5], [0.8, 0.8], [0.7, 0.7], [0.5, 0.9], [0.8, 0.8]]
    assert baselines.pareto_front(points, [True, True]) == [0, 1, 3, 4]
    assert baselines.pareto_front(points, [False, False]) == [0, 2, 3]
    with pytest.raises(ValueError, match="2 values each"):
        baselines.pareto_front([[1, 2, 3]], [True, True])
