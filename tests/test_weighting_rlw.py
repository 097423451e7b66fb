import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import RLW, _random, get


def _build(tasks=("a", "b", "c"), **kwargs):
    strategy = RLW(**kwargs)
    strategy.build(list(tasks))
    return strategy


def _step(strategy, present=None, losses=None):
    """One committed step; returns (total, weights)."""
    n = strategy.num_tasks
    present = tf.ones((n,), tf.bool) if present is None else tf.constant(present)
    losses = tf.ones((n,)) if losses is None else tf.constant(losses, tf.float32)
    total, weights, new_state = strategy.combine(
        losses, losses, present, tf.constant(0, tf.int64), strategy.state()
    )
    strategy.commit({**new_state, "task_weights": weights})
    return float(total), weights.numpy()


def test_normal_weights_are_softmax_of_the_seeded_normal_draw():
    strategy = get("rlw", seed=7)
    strategy.build(["a", "b", "c"])
    losses = tf.Variable([1.0, 2.0, 4.0])
    for n in range(3):
        with tf.GradientTape() as tape:
            total, weights, new_state = strategy.combine(
                losses, tf.constant([1.0, 2.0, 4.0]), tf.ones((3,), tf.bool), 0, strategy.state()
            )
        x = _random.normal(_random.key(7, n), (3,)).numpy()
        expected = np.exp(x) / np.exp(x).sum()
        np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
        np.testing.assert_allclose(tape.gradient(total, losses).numpy(), expected, rtol=1e-6)
        np.testing.assert_allclose(float(total), expected @ [1.0, 2.0, 4.0], rtol=1e-6)
        assert int(new_state["draws"]) == n + 1
        strategy.commit(new_state)


def test_dirichlet_weights_are_normalised_exponentials():
    strategy = _build(distribution="dirichlet", seed=2)
    _, weights = _step(strategy)
    x = -np.log(1.0 - _random.uniform(_random.key(2, 0), (3,)).numpy())
    np.testing.assert_allclose(weights, x / x.sum(), rtol=1e-6)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
def test_weights_sum_to_one_vary_and_average_to_uniform(distribution):
    strategy = _build(distribution=distribution, seed=3)
    step = tf.function(lambda: _step_graph(strategy))
    draws = np.array([step().numpy() for _ in range(400)])
    np.testing.assert_allclose(draws.sum(axis=1), 1.0, rtol=1e-5)
    assert (draws > 0).all() and (draws < 1).all()
    assert len({tuple(np.round(d, 6)) for d in draws}) == len(draws)
    np.testing.assert_allclose(draws.mean(axis=0), [1 / 3] * 3, atol=0.03)


def _step_graph(strategy):
    losses = tf.ones((3,))
    _, weights, new_state = strategy.combine(losses, losses, tf.ones((3,), tf.bool), 0, strategy.state())
    strategy.commit(new_state)
    return weights


def test_reproducible_for_a_seed_different_across_seeds_and_only_committed_draws_count():
    a, b, c = _build(seed=11), _build(seed=11), _build(seed=12)
    seq_a = [_step(a)[1] for _ in range(5)]
    seq_b = [_step(b)[1] for _ in range(5)]
    seq_c = [_step(c)[1] for _ in range(5)]
    np.testing.assert_array_equal(seq_a, seq_b)
    assert not np.allclose(seq_a, seq_c)
    # A step that is not committed (a rejected batch) does not consume a draw.
    fresh = _build(seed=11)
    fresh.combine(tf.ones(3), tf.ones(3), tf.ones((3,), tf.bool), 0, fresh.state())
    np.testing.assert_array_equal(_step(fresh)[1], seq_a[0])


def test_masked_task_gets_weight_zero_and_the_counter_still_advances():
    strategy = _build(seed=5)
    total, weights = _step(strategy, present=[True, False, True], losses=[1.0, 0.0, 3.0])
    assert weights[1] == 0.0
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(total, weights @ [1.0, 0.0, 3.0], rtol=1e-6)
    assert int(strategy.draws.numpy()) == 1
    total, weights = _step(strategy, present=[False, False, False], losses=[0.0, 0.0, 0.0])
    assert total == 0.0 and not np.isnan(weights).any()
    assert int(strategy.draws.numpy()) == 2


def test_xla_draws_the_same_weights():
    eager, compiled = _build(seed=9), _build(seed=9)
    fn = tf.function(lambda: _step_graph(compiled), jit_compile=True)
    for _ in range(3):
        np.testing.assert_allclose(fn().numpy(), _step(eager)[1], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"distribution": "bernoulli"}, "`distribution` must be one of"),
        ({"seed": 1.5}, "`seed` must be an integer"),
        ({"seed": -1}, "`seed` must be an integer"),
        ({"seed": True}, "`seed` must be an integer"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        RLW(**kwargs)
    assert "Received:" in str(info.value)


def test_seed_drawn_at_construction_is_kept_and_numpy_seeds_are_accepted():
    assert isinstance(RLW().get_config()["seed"], int)
    assert RLW(seed=np.int64(4)).get_config()["seed"] == 4
