"""kmtl.search: task-weight and branch-point searches, their resume file, the keras-tuner space."""

import json
import math

import keras
import numpy as np
import pytest

import kmtl
import kmtl.search
from kmtl import heads, trunks

EAGER = {"optimizer": "adam", "run_eagerly": True}  # tiny models: no tracing per candidate


def _tiny_data(n=48, seed=0):
    x, y = kmtl.data.synthetic_tasks(
        2, correlation=0.5, num_examples=n, input_dim=4, seed=seed, num_sinusoids=2
    )
    return x, y


def _tiny_build(calls=None, fail_at=None):
    """A dense two-task model; counts its calls in `calls` and raises on call number `fail_at`."""

    def build():
        if calls is not None:
            calls.append(1)
            if fail_at is not None and len(calls) == fail_at:
                raise RuntimeError("interrupted")
        return kmtl.build_model(kmtl.data.synthetic_heads(2), trunks.dense((4,)), input_shape=(4,))

    return build


# --------------------------------------------------------------------- the known best


def _rank_one_closed_form(x_train, y_train, x_val, y_val, weights):
    """Validation MSE per task of the minimiser of sum_t w_t ||y_t - a_t (x v + b) - c_t||^2.

    A shared linear layer of width 1 and linear heads predict the rank-1 matrix
    `X v a^T` (plus per-task intercepts). Centred, the weighted problem is a
    reduced-rank regression: the best rank-1 approximation (SVD) of the
    least-squares fit `X B W^(1/2)`, scaled back by `W^(-1/2)`.
    """
    x_mean, y_mean = x_train.mean(0), y_train.mean(0)
    x, y = x_train - x_mean, y_train - y_mean
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    scale = np.sqrt(np.asarray(weights, dtype=np.float64))
    _, _, vt = np.linalg.svd(x @ coefficients * scale, full_matrices=False)
    rank_one = coefficients * scale @ np.outer(vt[0], vt[0]) / scale
    predictions = (x_val - x_mean) @ rank_one + y_mean
    return ((y_val - predictions) ** 2).mean(0)


def test_grid_search_finds_the_closed_form_best_weights():
    # Two linear tasks y_t = u_t . x + noise_t (cos(u_0, u_1) = cos 30 degrees, noise sd 0.3 and 0.6)
    # through a shared linear layer of width 1: each weight vector's trained model is the
    # weighted rank-1 least-squares compromise, computed in closed form below.
    rng = np.random.default_rng(0)
    angle = np.deg2rad(30)
    directions = np.array([[1.0, np.cos(angle)], [0.0, np.sin(angle)]])

    def draw(n):
        x = rng.standard_normal((n, 2))
        return x, x @ directions + np.array([0.3, 0.6]) * rng.standard_normal((n, 2))

    (x_train, y_train), (x_val, y_val) = draw(4096), draw(4096)
    as_tasks = lambda x, y: (x.astype("float32"), {f"task_{t}": y[:, t].astype("float32") for t in range(2)})  # noqa: E731
    tasks = ["task_0", "task_1"]
    grid = kmtl.baselines.simplex_grid(tasks, 6)
    expected = np.array(
        [_rank_one_closed_form(x_train, y_train, x_val, y_val, [v[t] for t in tasks]) for v in grid]
    )
    # The objective {task_0: 1, task_1: 2} on the validation MSE: weighted mean of each task's
    # relative gap (%) to the best MSE any candidate reached.
    gaps = 100 * (expected - expected.min(0)) / expected.min(0)
    closed_form = (gaps @ np.array([1.0, 2.0])) / 3
    known_best = grid[int(np.argmin(closed_form))]
    second = np.sort(closed_form)[1]
    assert known_best == {"task_0": 4 / 3, "task_1": 2 / 3}  # not the objective's own 1:2 ratio
    assert second > 1.08 * closed_form.min()  # a margin the training error cannot bridge

    def build():
        return kmtl.build_model(
            [heads.Regression("task_0"), heads.Regression("task_1")],
            trunks.dense((1,), activation="linear"),
            input_shape=(2,),
        )

    search = kmtl.search.task_weights(
        build,
        as_tasks(x_train, y_train),
        as_tasks(x_val, y_val),
        grid=6,
        objective={"task_0": 1, "task_1": 2},
        metrics={"task_0": ["loss"], "task_1": ["loss"]},
        epochs=5,
        batch_size=128,
        compile_options={"optimizer": keras.optimizers.Adam(0.05)},
        refit=False,
        verbose=0,
    )
    assert search.best == known_best
    trained = np.array([[row["scores"][t]["loss"] for t in tasks] for row in search.table])
    np.testing.assert_allclose(trained, expected, rtol=0.06)
    assert len(search.pareto) == len(grid)  # the weighted compromises trade one task for the other


# --------------------------------------------------------------------- folds and resume


def test_k_fold_trains_each_candidate_once_per_disjoint_fold(tmp_path):
    x, y = _tiny_data(48)
    calls, steps = [], []

    class Steps(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            steps.append(self.params["steps"])

    search = kmtl.search.task_weights(
        _tiny_build(calls),
        (x, y),
        folds=3,
        grid=[[0.5, 1.5], [1.5, 0.5]],
        epochs=1,
        batch_size=8,
        compile_options=EAGER,
        callbacks=[Steps()],
        refit=False,
        verbose=0,
    )
    assert len(calls) == 2 * 3 and steps == [4] * 6  # 32 training examples of 48, batches of 8
    held = search.fold_indices
    assert len(held) == 3 and all(len(h) == 16 for h in held)
    np.testing.assert_array_equal(np.sort(np.concatenate(held)), np.arange(48))
    assert search.model is None and len(search.table) == 2
    for row in search.table:
        assert all(math.isfinite(row["scores"][t][m]) for t, m in search.pairs)
        assert all(row["std"][t][m] > 0 for t, m in search.pairs)  # three different held-out folds
    assert search.pairs == [(t, m) for t in ("task_0", "task_1") for m in ("mae", "rmse")]
    markdown = search.to_markdown()
    assert markdown.count("\n") == 3 and "*" in markdown and "±" in markdown
    figure = search.plot(tmp_path / "plane.png")
    assert (tmp_path / "plane.png").stat().st_size > 0 and figure.axes[0].get_xlabel() == "task_0 mae"


def test_interrupted_search_resumes_without_retraining(tmp_path):
    x, y = _tiny_data(32)
    results = tmp_path / "search.json"
    options = dict(
        folds=2, grid=[[0.5, 1.5], [1.5, 0.5]], epochs=1, batch_size=16, compile_options=EAGER, verbose=0
    )
    calls = []
    with pytest.raises(RuntimeError, match="interrupted"):
        kmtl.search.task_weights(_tiny_build(calls, fail_at=3), (x, y), results_file=results, **options)
    stored = json.loads(results.read_text())
    assert stored["format"] == 1 and stored["kind"] == "task_weights"
    assert [(u["candidate"]["weights"]["task_0"], u["fold"]) for u in stored["units"]] == [(0.5, 0), (0.5, 1)]

    calls = []
    search = kmtl.search.task_weights(_tiny_build(calls), (x, y), results_file=results, **options)
    assert len(calls) == 2 + 1  # the two missing (candidate, fold) runs, then the refit
    assert isinstance(search.model, kmtl.MultiTaskModel)
    first = stored["units"][0]["scores"]["task_0"]["mae"]
    second = stored["units"][1]["scores"]["task_0"]["mae"]
    assert search.table[0]["scores"]["task_0"]["mae"] == pytest.approx((first + second) / 2)
    assert len(json.loads(results.read_text())["units"]) == 4

    calls = []
    kmtl.search.task_weights(_tiny_build(calls), (x, y), results_file=results, refit=False, **options)
    assert calls == []  # everything finished: nothing is trained
    with pytest.raises(ValueError, match=r"other settings \(differing: \['epochs'\]\).*resume=False"):
        kmtl.search.task_weights(
            _tiny_build(calls), (x, y), results_file=results, **dict(options, epochs=2), refit=False
        )
    assert calls == []
    kmtl.search.task_weights(
        _tiny_build(calls), (x, y), results_file=results, resume=False, **dict(options, epochs=2), refit=False
    )
    assert len(calls) == 4


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(folds=1), r"`folds` must be an integer >= 2\. Received: folds=1"),
        (dict(folds=2, budget=0), r"`budget` must be an integer >= 1\. Received: budget=0"),
        (dict(folds=2, grid=[{"task_0": 1.0, "other": 1.0}]), r"must name exactly the tasks .*Received: "),
        (dict(folds=2, strategy="bayes"), r"one of \['grid', 'random'\]\. Received: strategy='bayes'"),
        (dict(folds=2, objective="best"), r"one of \['delta_m', 'mean_rank'\].*Received: objective='best'"),
        (dict(folds=2, objective={"task_0": 1.0}), r"exactly the tasks \['task_0', 'task_1'\]\. Received: "),
        (
            dict(folds=2, baselines="guess"),
            r"`baselines` must be None.*\"train\".*Received: baselines='guess'",
        ),
        (dict(), r"give `validation` data or `folds`.*Received: validation=None, folds=None"),
    ],
)
def test_bad_arguments_fail_before_training(arguments, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        kmtl.search.task_weights(_tiny_build(calls), _tiny_data(16), epochs=1, verbose=0, **arguments)
    assert calls == []


def test_shared_depth_out_of_range_is_named():
    data = _tiny_data(16)
    spec = (kmtl.data.synthetic_heads(2), trunks.dense((4, 4)), (4,))
    with pytest.raises(ValueError, match=r"0\.\.2 .*Received: shared_depth=3"):
        kmtl.search.branch_point(spec, data, data, depths=[0, 3], verbose=0)

    def build(depth):
        return kmtl.build_model(spec[0], spec[1], spec[2], shared_depth=depth)

    with pytest.raises(ValueError, match=r"refused shared_depth=5: .*\[0, 2\].*Received: shared_depth=5"):
        kmtl.search.branch_point(build, data, data, depths=[5], epochs=1, compile_options=EAGER, verbose=0)
    with pytest.raises(ValueError, match=r"give the `depths`.*Received: depths=None"):
        kmtl.search.branch_point(build, data, data, verbose=0)


# --------------------------------------------------------------------- the branch point


def test_branch_point_scores_every_depth_and_refits_the_best(tmp_path):
    train, validation = _tiny_data(48, seed=0), _tiny_data(32, seed=1)
    spec = (kmtl.data.synthetic_heads(2), trunks.dense((4, 4)), (4,))
    search = kmtl.search.branch_point(
        spec,
        train,
        validation,
        objective="mean_rank",
        epochs=1,
        batch_size=16,
        compile_options=EAGER,
        verbose=0,
    )
    assert [row["shared_depth"] for row in search.table] == [0, 1, 2]
    assert search.best in (0, 1, 2) and search.table[search.best_index]["objective"] == min(
        row["objective"] for row in search.table
    )
    expected = {0: "none", 1: "the first 1", 2: "all trunk variables"}[search.best]
    assert search.model.shared_description.startswith(expected)
    assert "| shared_depth |" in search.to_markdown()
    search.plot(tmp_path / "depth.png")
    assert (tmp_path / "depth.png").stat().st_size > 0


# --------------------------------------------------------------------- keras-tuner


def test_hypermodel_runs_in_a_keras_tuner_random_search(tmp_path):
    keras_tuner = pytest.importorskip("keras_tuner")
    (x, y), validation = _tiny_data(48, seed=0), _tiny_data(32, seed=1)
    spec = (kmtl.data.synthetic_heads(2), trunks.dense((4, 4)), (4,))
    model_space = kmtl.search.hypermodel(spec, space=("weights", "shared_depth"), compile_options=EAGER)
    tuner = keras_tuner.RandomSearch(
        model_space,
        objective=keras_tuner.Objective("score", "min"),
        max_trials=2,
        directory=str(tmp_path),
        project_name="kmtl",
        seed=0,
    )
    tuner.search(x, y, epochs=1, batch_size=16, validation_data=validation, verbose=0)
    trials = tuner.oracle.get_best_trials(2)
    assert len(trials) == 2 and all(math.isfinite(t.score) and t.score > 0 for t in trials)
    best = tuner.get_best_hyperparameters()[0].values
    assert (
        sorted(best) == ["shared_depth", "weight_task_0", "weight_task_1"] and 0 <= best["shared_depth"] <= 2
    )
    model = model_space.build(tuner.get_best_hyperparameters()[0])
    weights = model.compile_arguments["loss_weights"]
    assert sum(weights.values()) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"needs `baselines`.*Received: baselines=None"):
        kmtl.search.hypermodel(spec, objective="delta_m")


# --------------------------------------------------------------------- real data


def test_weight_search_on_mnist_digit_and_parity(mnist_dir):
    from _architecture_checks import accuracies, digit_parity, task_heads

    train, test = digit_parity("train", 2000), digit_parity("test", 1000)

    def build():
        return kmtl.build_model(task_heads(), trunks.dense((32,)), input_shape=(28, 28, 1))

    search = kmtl.search.task_weights(
        build,
        train,
        folds=2,
        budget=3,
        epochs=2,
        batch_size=32,
        compile_options={"optimizer": keras.optimizers.Adam(3e-3)},
        verbose=0,
    )
    assert [row["weights"]["digit"] for row in search.table] == [0.5, 1.0, 1.5]
    for row in search.table:
        assert all(math.isfinite(v) for t in row["scores"] for v in row["scores"][t].values())
        assert math.isfinite(row["objective"])
    scores = accuracies(search.model, *test)
    assert scores["digit"] > 0.5 and scores["parity"] > 0.6  # chance: 0.1 and 0.5


def test_weight_search_from_an_experiment_config():
    config = {"dataset": "digits", "tasks": ["digit", "parity"], "epochs": 1, "train_limit": 200}
    config.update(trunk="dense:16", batch_size=50)
    search = kmtl.search.task_weights(config, folds=2, budget=1, refit=False, verbose=0)
    assert search.best == {"digit": 1.0, "parity": 1.0}  # one candidate: the uniform vector
    assert sorted(np.concatenate(search.fold_indices)) == list(range(200))
    assert [p for p in search.pairs if p[0] == "digit"] == [("digit", "accuracy")]
    with pytest.raises(ValueError, match=r"remove the config's `weighting`.*Received: weighting="):
        kmtl.search.task_weights(dict(config, weighting="rlw"), folds=2, verbose=0)
