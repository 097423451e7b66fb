import itertools

import numpy as np
import pytest
import tensorflow as tf
from _weighting_helpers import pcgrad_reference

from kmtl.weighting import PCGrad


def _built(strategy, num_tasks):
    strategy.build([f"t{i}" for i in range(num_tasks)])
    return strategy


def _step(strategy, grads, present=None):
    """`combine_gradients` as the step calls it; returns (combined, alpha, new_state)."""
    T = int(grads[0].shape[0])
    present = tf.constant([True] * T if present is None else present)
    return strategy.combine_gradients(
        grads, tf.ones((T,), grads[0].dtype), present, tf.constant(0, tf.int64), strategy.state()
    )


def test_conflicting_pair_matches_hand_computation():
    g1, g2 = np.array([2.0, 0.0]), np.array([-1.0, 1.0])
    # g1 . g2 = -2: g1' = g1 + g2 = [1, 1]; g2' = g2 + (2/4) g1 = [0, 1].
    d = PCGrad(seed=1).aggregate(np.stack([g1, g2])).numpy()
    np.testing.assert_allclose(d, [1.0, 2.0], atol=1e-12)


def test_non_conflicting_pair_is_the_plain_sum():
    G = np.array([[1.0, 2.0, 0.0], [0.5, -0.1, 3.0]])  # g1 . g2 = 0.3 > 0
    np.testing.assert_allclose(PCGrad(seed=0).aggregate(G).numpy(), G.sum(0), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_three_tasks_match_a_visiting_order(seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(3, 5))
    G[2] = -G[0] + 0.3 * rng.normal(size=5)  # force conflicts
    d = PCGrad(seed=seed).aggregate(G).numpy()
    perms = list(itertools.permutations(range(3)))
    candidates = [pcgrad_reference(G, orders) for orders in itertools.product(perms, repeat=3)]
    assert min(np.abs(d - c).max() for c in candidates) < 1e-10


def test_orders_are_a_pure_function_of_seed_and_draws():
    G = np.random.default_rng(5).normal(size=(4, 6))
    G[3] = -G[0] - G[1]
    K = tf.constant(G @ G.T)
    args = (tf.ones(4, tf.float64), tf.ones(4, bool), tf.constant(0, tf.int64))
    a, b = _built(PCGrad(seed=7), 4), _built(PCGrad(seed=7), 4)
    first, second = [], []
    for _ in range(6):
        for strategy, out in ((a, first), (b, second)):
            alpha, new_state = strategy.weights_from_gram(K, *args, strategy.state())
            again, _ = strategy.weights_from_gram(K, *args, strategy.state())
            np.testing.assert_array_equal(alpha.numpy(), again.numpy())  # pure: same state, same draw
            assert int(new_state["draws"]) == int(strategy.draws.numpy()) + 1
            strategy.commit(new_state)
            out.append(alpha.numpy())
    np.testing.assert_array_equal(np.array(first), np.array(second))
    assert int(a.draws.numpy()) == 6
    assert len({tuple(np.round(x, 12)) for x in first}) > 1  # the orders change from draw to draw


def test_masked_task_has_zero_weight():
    G = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]])
    combined, alpha, _ = _step(_built(PCGrad(seed=0), 3), [tf.constant(G)], present=[True, True, False])
    np.testing.assert_allclose(combined[0].numpy(), [0.5, 1.5], atol=1e-12)
    assert alpha.numpy()[2] == 0.0


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((2, 3)), np.zeros(3)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([2.0, 4.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        (np.array([[1.0, 2.0], [-2.0, -4.0]]), np.zeros(2)),
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([1.0, 2.0])),
    ],
)
def test_degenerate_inputs(G, expected):
    np.testing.assert_allclose(PCGrad(seed=0).aggregate(G).numpy(), expected, atol=1e-12)


def test_combine_gradients_per_variable_in_float32():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 4)).astype("float32"), rng.normal(size=(2, 5)).astype("float32")
    b[1] = -b[0]
    combined, _, _ = _step(_built(PCGrad(seed=0), 2), [tf.constant(a), tf.constant(b)])
    G = np.concatenate([a.reshape(2, -1), b], axis=1).astype("float64")
    np.testing.assert_allclose(
        np.concatenate([combined[0].numpy().ravel(), combined[1].numpy()]),
        pcgrad_reference(G, [[0, 1], [0, 1]]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_seed_none_is_drawn_and_kept():
    strategy = PCGrad()
    assert isinstance(strategy.seed, int)
    assert PCGrad.from_config(strategy.get_config()).seed == strategy.seed


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "0", True])
def test_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="Received: seed="):
        PCGrad(seed=seed)
