"""The contract every weighting strategy keeps, checked over `kmtl.weighting.names()`.

One parametrized suite, both families: serialization round trip (config and
state), state stability on random and degenerate inputs (with and without
XLA), a masked task, the one-task case, and a short fit on real MNIST
digit + parity (from `$KMTL_DATA_DIR`) that improves both tasks and survives
a `.keras` save and reload. Strategy-specific numbers live in each
strategy's own test file.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import trunks

NAMES = kmtl.weighting.names()
TASKS = ["a", "b", "c"]
DIM = 12
# Random strategies draw from kmtl.weighting._random (plain integer ops): the same
# numbers with and without XLA, so every strategy is compared across both.
RANDOM = set()


def _make(name, tasks=TASKS):
    strategy = kmtl.weighting.get(name)
    strategy.build(list(tasks))
    return strategy


def _inputs(rng, num_tasks, present=None, kind="random"):
    """Random per-task losses and gradients; `kind` picks a degenerate gradient case."""
    losses = np.exp(rng.uniform(math.log(1e-4), math.log(1e2), num_tasks)).astype("float32")
    grads = rng.normal(size=(num_tasks, DIM)).astype("float32")
    if kind == "zeros":
        grads[:] = 0.0
    elif kind == "identical":
        grads[:] = grads[0]
    elif kind == "opposite" and num_tasks > 1:
        grads[1] = -grads[0]
    elif kind == "huge":
        grads *= 1e4
    elif kind == "tiny":
        grads *= 1e-8
    elif kind == "zero_loss":
        losses[0] = 0.0
    present = np.ones(num_tasks, bool) if present is None else np.asarray(present)
    losses[~present] = 0.0
    grads[~present] = 0.0
    return tf.constant(losses), tf.constant(present), tf.constant(grads)


def _step_fn(strategy, jit_compile=None):
    """One step as the training step runs it: the pure function, then `commit`.

    Returns (output, task weights, d output / d losses).
    """

    def step(losses, present, grads, iteration):
        state = strategy.state()
        if strategy.level == "loss":
            with tf.GradientTape() as tape:
                tape.watch(losses)
                total, weights, new_state = strategy.combine(losses, losses, present, iteration, state)
            output, d_losses = total, tape.gradient(total, losses)
        else:
            combined, weights, new_state = strategy.combine_gradients(
                [grads], losses, present, iteration, state
            )
            output, d_losses = combined[0], tf.zeros_like(losses)
        strategy.commit({**new_state, "task_weights": weights})
        return output, tf.identity(strategy.task_weights), d_losses

    if jit_compile is None:
        return step
    return tf.function(step, jit_compile=jit_compile)


def _run(fn, strategy, inputs, iteration):
    losses, present, grads = inputs
    return [t.numpy() for t in fn(losses, present, grads, tf.constant(iteration, tf.int64))]


def _clone(strategy):
    """An identical, fresh copy (same config, so the same seed for random strategies)."""
    return keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))


def _state(strategy):
    return {v.path: v.numpy().copy() for v in strategy.variables if v.name != "task_weights"}


def test_registry_lists_documented_strategies_of_both_families():
    levels = set()
    for name in NAMES:
        strategy = kmtl.weighting.get(name)
        assert isinstance(strategy, kmtl.weighting.Weighting)
        assert strategy.level in ("loss", "gradient"), name
        levels.add(strategy.level)
        doc = type(strategy).__doc__ or ""
        assert ">>>" in doc and "Args:" in doc, name
        if name != "equal":
            assert "References:" in doc, name
        if strategy.level == "gradient":
            assert callable(getattr(strategy, "aggregate", None)), name
    assert levels == {"loss", "gradient"}


@pytest.mark.parametrize("name", NAMES)
def test_serialization_round_trip_keeps_config_and_state(name):
    rng = np.random.default_rng(0)
    strategy = _make(name)
    fn = _step_fn(strategy, jit_compile=False)
    for i in range(4):
        _run(fn, strategy, _inputs(rng, 3), i)
    strategy.on_epoch_end(0)
    _run(fn, strategy, _inputs(rng, 3), 4)
    config = keras.saving.serialize_keras_object(strategy)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(strategy)
    assert restored.get_config() == strategy.get_config()
    assert restored.built and restored.task_names == TASKS
    restored.set_weights(strategy.get_weights())
    for a, b in zip(restored.get_weights(), strategy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Same state, same next step: nothing that matters lives outside the weights.
    inputs = _inputs(rng, 3)
    out_a = _run(_step_fn(strategy, jit_compile=False), strategy, inputs, 5)
    out_b = _run(_step_fn(restored, jit_compile=False), restored, inputs, 5)
    for a, b in zip(out_a, out_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_state_stays_finite_with_and_without_xla(name):
    # Random and degenerate inputs (zero, identical, opposite, huge and tiny
    # gradients, a zero loss, random masks), in a tf.function with and without
    # jit_compile; the two agree on the first (random) steps except for
    # strategies whose random draws come from XLA's own kernels.
    rng = np.random.default_rng(1)
    graph = _make(name)
    xla = _clone(graph)
    graph_fn, xla_fn = _step_fn(graph, jit_compile=False), _step_fn(xla, jit_compile=True)
    kinds = ["random", "zeros", "identical", "opposite", "huge", "tiny", "zero_loss"]
    for i in range(70):
        kind = "random" if i < 3 else kinds[i % len(kinds)]
        present = rng.random(3) < 0.8 if i % 3 == 2 else None
        inputs = _inputs(rng, 3, present, kind)
        out_graph = _run(graph_fn, graph, inputs, i)
        out_xla = _run(xla_fn, xla, inputs, i)
        for output in out_graph + out_xla:
            assert np.isfinite(output).all(), (i, kind, output)
        if i < 3 and name not in RANDOM:
            for a, b in zip(out_graph, out_xla, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        if i % 20 == 19:
            graph.on_epoch_end(i // 20)
            xla.on_epoch_end(i // 20)
    for strategy in (graph, xla):
        for path, value in _state(strategy).items():
            assert value.dtype.kind != "f" or np.isfinite(value).all(), path


@pytest.mark.parametrize("name", NAMES)
def test_masked_task_gets_no_weight_and_its_values_are_ignored(name):
    # Two copies see the same steps, except for the value of the absent
    # task's loss (0, as the model passes it, or garbage): weights, outputs
    # and state must not depend on it. (Each strategy's own tests check that
    # its per-task history is frozen while a task is absent.)
    rng = np.random.default_rng(3)
    zero = _make(name)
    garbage = _clone(zero)
    zero_fn, garbage_fn = _step_fn(zero, jit_compile=False), _step_fn(garbage, jit_compile=False)
    for i in range(4):
        inputs = _inputs(rng, 3)
        _run(zero_fn, zero, inputs, i)
        _run(garbage_fn, garbage, inputs, i)
    for i in range(4, 9):
        losses, present, grads = _inputs(rng, 3, present=[True, False, True])
        garbage_losses = tf.tensor_scatter_nd_update(losses, [[1]], [123.0])
        out_zero = _run(zero_fn, zero, (losses, present, grads), i)
        out_garbage = _run(garbage_fn, garbage, (garbage_losses, present, grads), i)
        for a, b in zip(out_zero, out_garbage, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        output, weights, d_losses = out_zero
        assert np.isfinite(output).all()
        assert weights[1] == 0.0, weights
        assert d_losses[1] == 0.0, d_losses
        if zero.trainable_variables:
            step = tf.constant(i, tf.int64)
            with tf.GradientTape() as tape:
                total, _, _ = zero.combine(losses, losses, present, step, zero.state())
            for variable, grad in zip(
                zero.trainable_variables, tape.gradient(total, zero.trainable_variables), strict=True
            ):
                if grad is not None and variable.shape and variable.shape[0] == 3:
                    assert np.abs(grad.numpy()[1]).max() == 0.0, variable.path
    zero.on_epoch_end(0)
    garbage.on_epoch_end(0)
    state_zero, state_garbage = _state(zero), _state(garbage)
    for path, value in state_zero.items():
        assert value.dtype.kind != "f" or np.isfinite(value).all(), path
        np.testing.assert_allclose(
            value, state_garbage[path.replace(zero.name, garbage.name, 1)], err_msg=path
        )


@pytest.mark.parametrize("name", NAMES)
def test_one_task(name):
    rng = np.random.default_rng(4)
    strategy = _make(name, ["only"])
    fn = _step_fn(strategy, jit_compile=False)
    for i in range(6):
        kind = "zeros" if i == 3 else "random"
        losses, present, grads = _inputs(rng, 1, kind=kind)
        output, weights, d_losses = _run(fn, strategy, (losses, present, grads), i)
        assert np.isfinite(output).all() and np.isfinite(weights).all()
        if strategy.level == "loss":
            assert d_losses[0] > 0, d_losses
        elif kind == "zeros":
            np.testing.assert_array_equal(output, np.zeros(DIM))
        else:
            # One task: the update is a positive multiple of its gradient.
            g = grads.numpy()[0]
            cosine = output @ g / (np.linalg.norm(output) * np.linalg.norm(g))
            assert cosine > 0.999, cosine
        if i == 2:
            strategy.on_epoch_end(0)
    if strategy.level == "gradient":
        g = rng.normal(size=(1, DIM)).astype("float32")
        d = kmtl.weighting.get(name).aggregate(g).numpy()
        assert d @ g[0] > 0


def _all_variables(strategy):
    return {v.path: v.numpy().copy() for v in strategy.variables}


@pytest.mark.parametrize("name", NAMES)
def test_pure_functions_change_nothing_and_commit_can_refuse(name):
    # combine / combine_gradients / aggregate are pure: the state changes only
    # through `commit`, and `commit(..., accept=False)` keeps every variable.
    rng = np.random.default_rng(5)
    strategy = _make(name)
    fn = _step_fn(strategy, jit_compile=False)
    for i in range(3):
        _run(fn, strategy, _inputs(rng, 3), i)
    before = _all_variables(strategy)
    losses, present, grads = _inputs(rng, 3)
    step = tf.constant(3, tf.int64)

    @tf.function
    def pure_then_refuse():
        state = strategy.state()
        if strategy.level == "loss":
            _, weights, new_state = strategy.combine(losses, losses, present, step, state)
        else:
            _, weights, new_state = strategy.combine_gradients([grads], losses, present, step, state)
        strategy.commit({**new_state, "task_weights": weights}, accept=tf.constant(False))
        return weights

    pure_then_refuse()
    strategy.aggregate(grads.numpy(), losses=losses, present=present, step=3)
    after = _all_variables(strategy)
    for path, value in before.items():
        np.testing.assert_array_equal(value, after[path], err_msg=path)


@pytest.mark.parametrize("name", NAMES)
def test_aggregate_is_matrix_in_vector_out_for_every_strategy(name):
    # Loss level: the update is G^T weights, the weights being d total / d losses.
    rng = np.random.default_rng(6)
    G = rng.normal(size=(3, DIM))
    strategy = kmtl.weighting.get(name)
    d = strategy.aggregate(G).numpy()
    assert d.shape == (DIM,) and np.isfinite(d).all()
    assert not strategy.built  # a fresh strategy is not built by aggregate
    if strategy.level == "loss":
        built = _make(name)
        losses = tf.ones((3,))
        with tf.GradientTape() as tape:
            tape.watch(losses)
            total, weights, _ = built.combine(
                losses, losses, tf.ones((3,), bool), tf.constant(0, tf.int64), built.state()
            )
        np.testing.assert_allclose(
            weights.numpy(), tape.gradient(total, losses).numpy(), rtol=1e-5, atol=1e-7
        )


def _fresh_model(heads, name):
    keras.utils.set_random_seed(0)
    model = kmtl.build_model(heads=heads, trunk=trunks.dense((32,)), input_shape=(28, 28, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), weighting=name)
    return model


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    tasks = ["digit", "parity"]
    train = kmtl.data.mnist_tasks(tasks, split="train[:1024]", batch_size=128, seed=0)
    test = kmtl.data.mnist_tasks(tasks, split="test[:500]", batch_size=500)
    heads = kmtl.data.task_heads("mnist", tasks)
    # The same seed gives the same initial model whatever the strategy.
    before = _fresh_model(heads, None).evaluate(test, return_dict=True, verbose=0)
    return heads, train, test, before


@pytest.mark.parametrize("name", NAMES)
def test_fit_on_mnist_improves_both_tasks(name, mnist):
    # Saving and loading are checked in a fresh process by tests/test_saved_models.py
    # (every strategy, trained) and in-process by the serialization test above.
    heads, train, test, before = mnist
    model = _fresh_model(heads, name)
    history = model.fit(train, epochs=2, verbose=0)
    after = model.evaluate(test, return_dict=True, verbose=0)
    for task in ("digit", "parity"):
        assert after[f"{task}_loss"] < 0.8 * before[f"{task}_loss"], (task, before, after)
        weights = history.history[f"{task}_weight"]
        assert len(weights) == 2 and all(math.isfinite(w) for w in weights), weights


@pytest.mark.parametrize("value", [None, float("nan"), 0, -2, 1.5, True, "2"])
def test_base_arguments_are_checked_with_clear_errors(value):
    with pytest.raises(ValueError, match=r"`update_every` must be an integer >= 1\. Received: update_every="):
        kmtl.weighting.get("pcgrad", update_every=value)
    with pytest.raises(ValueError, match=r"`mode` must be one of"):
        kmtl.weighting.get("pcgrad", mode="everything")
    with pytest.raises(ValueError, match=r"`engine` must be one of"):
        kmtl.weighting.get("mgda", engine="fast")
    assert kmtl.weighting.get("pcgrad", update_every=np.int64(3)).update_every == 3
