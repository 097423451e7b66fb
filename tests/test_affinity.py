"""Lookahead inter-task affinity (`kmtl.diagnostics.task_affinity`), its monitor and its plots."""

import math

import keras
import matplotlib
import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import diagnostics, heads, plots, trunks

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

TASKS = ("a", "b", "c")


def _regression_model(tasks=TASKS, optimizer=None, activation="linear", **compile_kwargs):
    keras.utils.set_random_seed(0)
    model = kmtl.build_model(
        heads=[heads.Regression(t) for t in tasks],
        trunk=trunks.dense((3,), activation=activation),
        input_shape=(8,),
    )
    model.compile(optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.1), **compile_kwargs)
    return model


def _arrays(n=24, seed=0, tasks=TASKS):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = {t: rng.normal(size=n).astype("float32") for t in tasks}
    return x, y


def _dataset(x, y, weights=None, batch_size=8):
    parts = (x, y) if weights is None else (x, y, weights)
    return tf.data.Dataset.from_tensor_slices(parts).batch(batch_size)


# --- the formula, by hand --------------------------------------------------------
def _reference_affinity(model, x, y, weights, rate, batch_size):
    """Z_{i->j} of a linear trunk with regression heads, computed in float64 numpy.

    h = x W + c, p_t = h v_t + d_t, L_t = sum(m (p_t - y_t)^2) / sum(m).
    dL_t/dW = x^T (g_t v_t^T), dL_t/dc = sum_b g_t v_t^T with g_t = 2 m (p_t - y_t) / sum(m).
    Task i's own (unweighted) gradient steps the trunk; L_j is evaluated again.
    """
    kernel, bias = (w.astype("float64") for w in model.encoder.get_weights())
    head = {t: [w.astype("float64") for w in model.decoders[t].get_weights()] for t in TASKS}

    def losses(xb, yb, mb, kernel, bias):
        h = xb @ kernel + bias
        out = {}
        for t in TASKS:
            v, d = head[t]
            residual = (h @ v)[:, 0] + d[0] - yb[t]
            out[t] = (
                float(np.sum(mb[t] * residual**2) / np.sum(mb[t])),
                2 * mb[t] * residual / np.sum(mb[t]),
                v,
            )
        return out

    total, count = np.zeros((3, 3)), np.zeros((3, 3))
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].astype("float64")
        yb = {t: y[t][start : start + batch_size].astype("float64") for t in TASKS}
        mb = {t: weights[t][start : start + batch_size].astype("float64") for t in TASKS}
        present = [np.sum(mb[t]) > 0 for t in TASKS]
        with np.errstate(invalid="ignore"):  # an absent task's loss is 0/0, and unused
            base = losses(xb, yb, mb, kernel, bias)
        for i, source in enumerate(TASKS):
            if not present[i]:
                continue
            _, g, v = base[source]
            upstream = g[:, None] * v[:, 0][None, :]
            with np.errstate(invalid="ignore"):
                after = losses(xb, yb, mb, kernel - rate * xb.T @ upstream, bias - rate * upstream.sum(0))
            for j, target in enumerate(TASKS):
                if i != j and present[j]:
                    total[i, j] += 1.0 - after[target][0] / base[target][0]
                    count[i, j] += 1
    return {(TASKS[i], TASKS[j]): total[i, j] / count[i, j] for i in range(3) for j in range(3) if i != j}


def test_affinity_matches_a_hand_computed_lookahead():
    # Static weights are divided out; batch 2 labels no example of "c" (left out of c's pairs).
    model = _regression_model(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss_weights={"b": 0.5})
    x, y = _arrays()
    weights = {t: np.ones(24, "float32") for t in TASKS}
    weights["a"][:8] = np.linspace(0.0, 2.0, 8)
    weights["c"][8:16] = 0.0
    data = _dataset(x, y, weights)
    affinity = diagnostics.task_affinity(model, data)
    expected = _reference_affinity(model, x, y, weights, 0.5, 8)
    assert list(affinity) == [(a, b) for a in TASKS for b in TASKS if a != b]
    for pair, value in expected.items():
        assert abs(value) > 1e-3, pair  # the check is not vacuous
        assert affinity[pair] == pytest.approx(value, rel=1e-4), pair
    # The same step size given explicitly, and steps= limits the batches.
    explicit = diagnostics.task_affinity(model, data, learning_rate=0.5)
    assert explicit == pytest.approx(affinity, rel=1e-5, abs=1e-8)
    first = diagnostics.task_affinity(model, data, steps=1)
    assert first[("a", "b")] == pytest.approx(
        _reference_affinity(model, x[:8], {t: v[:8] for t, v in y.items()}, weights, 0.5, 8)[("a", "b")],
        rel=1e-4,
    )


def test_a_pair_never_labelled_together_is_nan_and_matrix_form():
    model = _regression_model()
    x, y = _arrays(n=8)
    weights = {t: np.ones(8, "float32") for t in TASKS}
    weights["c"][:] = 0.0
    affinity = diagnostics.task_affinity(model, _dataset(x, y, weights))
    assert math.isnan(affinity[("a", "c")]) and math.isnan(affinity[("c", "b")])
    assert math.isfinite(affinity[("a", "b")])
    matrix, names = diagnostics.affinity_matrix(affinity)
    assert names == list(TASKS) and matrix.shape == (3, 3)
    assert np.all(np.isnan(np.diag(matrix)))
    assert matrix[0, 1] == affinity[("a", "b")] and matrix[1, 0] == affinity[("b", "a")]
    again, names = diagnostics.affinity_matrix(matrix, tasks=["x", "y", "z"])
    assert names == ["x", "y", "z"] and np.array_equal(again, matrix, equal_nan=True)


def test_default_step_size_is_the_optimizers_current_learning_rate():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5)
    model = _regression_model(optimizer=keras.optimizers.SGD(learning_rate=schedule), activation="tanh")
    x, y = _arrays(n=16)
    data = _dataset(x, y)
    model.fit(data, epochs=1, verbose=0)  # two steps: the rate is now 0.2 * 0.5**2
    rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    assert rate == pytest.approx(0.05)
    default = diagnostics.task_affinity(model, data)
    explicit = diagnostics.task_affinity(model, data, learning_rate=rate)
    for pair, value in default.items():
        assert value == pytest.approx(explicit[pair], rel=1e-6, abs=1e-9)


def _snapshot(model):
    groups = {
        "weights": model.weights,
        "optimizer": model.optimizer.variables,
        "trackers": [v for metric in model.metrics for v in metric.variables],
        "strategy": model.weighting.variables,
    }
    return {name: [np.array(keras.ops.convert_to_numpy(v)) for v in group] for name, group in groups.items()}


def test_nothing_changes():
    model = _regression_model(optimizer="adam", activation="tanh", weighting="uncertainty")
    x, y = _arrays(n=16)
    data = _dataset(x, y)
    model.fit(data, epochs=1, verbose=0)  # optimizer slots, trackers and strategy state hold values
    model.evaluate(data, verbose=0)
    before = _snapshot(model)
    assert before["optimizer"] and before["trackers"] and before["strategy"]
    assert any(np.any(v != 0) for v in before["trackers"])
    affinity = diagnostics.task_affinity(model, data, learning_rate=0.5)
    assert all(math.isfinite(v) for v in affinity.values())
    after = _snapshot(model)
    for name in before:
        assert len(after[name]) == len(before[name]), name
        for old, new in zip(before[name], after[name]):
            assert old.dtype == new.dtype and np.array_equal(old, new), name


# --- the monitor -----------------------------------------------------------------
def test_monitor_logs_every_ordered_pair_on_mnist_or_digits():
    dataset = "mnist" if kmtl.data.available("mnist") else "digits"
    train = kmtl.data.task_dataset(dataset, ["digit", "parity"], split="train[:512]", batch_size=128)
    probe = kmtl.data.task_dataset(dataset, ["digit", "parity"], split="test[:128]", batch_size=64)
    images, _ = next(iter(probe))
    keras.utils.set_random_seed(0)
    model = kmtl.build_model(
        heads=[heads.Classification("digit", 10), heads.Binary("parity")],
        trunk=trunks.dense((16,)),
        input_shape=tuple(images.shape[1:]),
    )
    model.compile(optimizer="adam")
    monitor = diagnostics.TaskAffinityMonitor(probe, steps=2)
    history = model.fit(train, epochs=1, verbose=0, callbacks=[monitor])
    for key in (diagnostics.affinity_key("digit", "parity"), diagnostics.affinity_key("parity", "digit")):
        assert key in history.history, sorted(history.history)
        assert len(history.history[key]) == 1 and math.isfinite(history.history[key][0])
    assert "affinity_digit_parity" in history.history  # the documented format
    fig = plots.plot_pairwise_over_time(history, kind="affinity")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["digit → parity", "parity → digit"]
    plt.close(fig)


def test_monitor_config_round_trip():
    data = _dataset(*_arrays(n=8))
    monitor = diagnostics.TaskAffinityMonitor(data, steps=2, every=3, learning_rate=0.01)
    config = monitor.get_config()
    assert config == {"steps": 2, "every": 3, "learning_rate": 0.01}
    rebuilt = diagnostics.TaskAffinityMonitor.from_config({**config, "data": data})
    assert isinstance(rebuilt, diagnostics.TaskAffinityMonitor) and rebuilt.get_config() == config
    assert rebuilt.data is data
    assert keras.saving.get_registered_object("kmtl>TaskAffinityMonitor") is diagnostics.TaskAffinityMonitor
    with pytest.raises(ValueError, match="holds no dataset"):
        diagnostics.TaskAffinityMonitor.from_config(config)


def test_monitor_every_and_key_helpers():
    model = _regression_model(tasks=("a", "b"))
    data = _dataset(*_arrays(n=8, tasks=("a", "b")))
    history = model.fit(data, epochs=2, verbose=0, callbacks=[diagnostics.TaskAffinityMonitor(data, every=2)])
    assert len(history.history["affinity_a_b"]) == 1 and len(history.history["affinity_b_a"]) == 1
    assert diagnostics.cosine_key("a", "b") == "cos_a_b"


# --- plots -----------------------------------------------------------------------
def _saved_shape(fig, tmp_path, name):
    path = tmp_path / name
    fig.savefig(path)
    assert path.is_file() and path.stat().st_size > 0
    width, height = fig.get_size_inches() * fig.dpi
    image = matplotlib.image.imread(path)
    plt.close(fig)
    return image.shape[:2], (round(height), round(width))


def test_plot_affinity_writes_a_heatmap(tmp_path):
    affinity = {
        ("a", "b"): 0.2,
        ("b", "a"): -0.1,
        ("a", "c"): 0.05,
        ("c", "a"): 0.0,
        ("b", "c"): 0.3,
        ("c", "b"): -0.4,
    }
    fig = plots.plot_affinity(affinity, figsize=(4, 3))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert {t.get_text() for t in ax.texts} == {"0.2", "-0.1", "0.05", "0", "0.3", "-0.4"}
    image = ax.images[0]
    assert image.norm.vmin == -image.norm.vmax == -0.4  # diverging, centred at 0
    shape, expected = _saved_shape(fig, tmp_path, "a.png")
    assert shape == expected
    matrix = np.array([[np.nan, 1.0], [-2.0, np.nan]])
    fig, ax = plt.subplots(figsize=(3, 3))
    assert plots.plot_affinity(matrix, tasks=["x", "y"], ax=ax) is fig
    shape, expected = _saved_shape(fig, tmp_path, "b.png")
    assert shape == expected


def test_plot_pairwise_over_time_from_a_dict(tmp_path):
    history = {
        "loss": [1.0, 0.8, 0.7],
        "cos_a_b": [0.1, -0.2, 0.3],
        "cos_a_c": [0.5, 0.4, 0.2],
        "cos_b_c": [-0.5, -0.1, 0.0],
        "affinity_a_b": [0.01, 0.02, 0.03],
        "affinity_b_a": [-0.01, 0.0, 0.01],
    }
    fig = plots.plot_pairwise_over_time(history, kind="cos", figsize=(5, 3))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a_b", "a_c", "b_c"]
    assert ax.get_xlabel() == "epoch" and ax.images[0].get_array().shape == (3, 3)
    assert ax.images[0].norm.vmin == -1.0 and ax.images[0].norm.vmax == 1.0
    shape, expected = _saved_shape(fig, tmp_path, "cos.png")
    assert shape == expected
    fig = plots.plot_pairwise_over_time(history, kind="affinity", tasks=["a", "b"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a → b", "b → a"]
    shape, expected = _saved_shape(fig, tmp_path, "affinity.png")
    assert shape == expected


def test_plot_errors():
    with pytest.raises(ValueError, match="no affinity keys"):
        plots.plot_pairwise_over_time({"loss": [1.0], "cos_a_b": [0.1]}, kind="affinity")
    with pytest.raises(ValueError, match="no cos keys"):
        plots.plot_pairwise_over_time({"loss": [1.0]})
    with pytest.raises(ValueError, match="kind='angle'"):
        plots.plot_pairwise_over_time({"cos_a_b": [0.1]}, kind="angle")
    with pytest.raises(ValueError, match="History or a dict"):
        plots.plot_pairwise_over_time([0.1])
    with pytest.raises(ValueError, match="pairs"):
        plots.plot_affinity({})
    with pytest.raises(ValueError, match="square"):
        plots.plot_affinity(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="task names"):
        plots.plot_affinity(np.zeros((2, 2)), tasks=["a"])
    with pytest.raises(ValueError, match="not in"):
        plots.plot_affinity({("a", "b"): 0.1}, tasks=["a"])


# --- errors ----------------------------------------------------------------------
def test_errors():
    x, y = _arrays(n=8)
    data = _dataset(x, y)
    uncompiled = kmtl.build_model(
        heads=[heads.Regression(t) for t in TASKS], trunk=trunks.dense((3,)), input_shape=(8,)
    )
    with pytest.raises(ValueError, match=r"call `model.compile\(...\)` first"):
        diagnostics.task_affinity(uncompiled, data)
    with pytest.raises(ValueError, match="compiled kmtl.MultiTaskModel. Received: Sequential"):
        diagnostics.task_affinity(keras.Sequential([keras.layers.Dense(1)]), data)
    single = _regression_model(tasks=("a",))
    with pytest.raises(ValueError, match="at least two trained tasks"):
        diagnostics.task_affinity(single, _dataset(x, {"a": y["a"]}))
    one_trained = _regression_model(loss={"b": None, "c": None})
    with pytest.raises(ValueError, match=r"at least two trained tasks. Received: \['a'\]"):
        diagnostics.task_affinity(one_trained, data)

    model = _regression_model()
    with pytest.raises(ValueError, match="empty dataset"):
        diagnostics.task_affinity(model, data.take(0))
    for bad in (0, -0.1, float("nan"), float("inf"), "fast", True):
        with pytest.raises(ValueError, match=r"finite number > 0. Received: learning_rate="):
            diagnostics.task_affinity(model, data, learning_rate=bad)
    with pytest.raises(ValueError, match="steps=0"):
        diagnostics.task_affinity(model, data, steps=0)

    zero_rate = _regression_model(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    with pytest.raises(ValueError, match=r"Received: optimizer.learning_rate=0.0"):
        diagnostics.task_affinity(zero_rate, data)

    class Opaque(keras.optimizers.SGD):
        @property
        def learning_rate(self):
            raise AttributeError("no readable learning rate")

    opaque = _regression_model(optimizer=Opaque())
    with pytest.raises(ValueError, match="pass `learning_rate=` explicitly. Received: optimizer=Opaque"):
        diagnostics.task_affinity(opaque, data)
    assert diagnostics.task_affinity(opaque, data, learning_rate=0.1)  # an explicit rate works

    weightless = _regression_model(loss_weights={"a": 0.0})
    with pytest.raises(ValueError, match=r"give \['a'\] a positive weight"):
        diagnostics.task_affinity(weightless, data)

    exact = _regression_model()
    exact.decoders["a"].set_weights([np.zeros_like(w) for w in exact.decoders["a"].get_weights()])
    zero_target = _dataset(x, {**y, "a": np.zeros(8, "float32")})
    with pytest.raises(ValueError, match=r"non-zero; the loss of \['a'\] is not"):
        diagnostics.task_affinity(exact, zero_target)

    for kwargs, message in (
        ({"every": 0}, "every=0"),
        ({"steps": 0}, "steps=0"),
        ({"learning_rate": -1}, "=-1"),
    ):
        with pytest.raises(ValueError, match=message):
            diagnostics.TaskAffinityMonitor(data, **kwargs)
    with pytest.raises(ValueError, match="TaskAffinityMonitor needs at least two trained tasks"):
        single.fit(
            _dataset(x, {"a": y["a"]}), epochs=1, verbose=0, callbacks=[diagnostics.TaskAffinityMonitor(data)]
        )
