import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import PCGrad, get


def _reference(G, orders):
    """PCGrad done on the gradients themselves, with the given visiting orders."""
    out = []
    for i, order in enumerate(orders):
        g = G[i].copy()
        for j in order:
            if j != i and g @ G[j] < 0:
                g = g - (g @ G[j]) / (G[j] @ G[j]) * G[j]
        out.append(g)
    return np.sum(out, axis=0)


def _combine(strategy, G, present=None):
    G = tf.constant(G)
    T = G.shape[0]
    if not strategy.built:
        strategy.build([f"t{i}" for i in range(T)])
    present = tf.constant([True] * T if present is None else present)
    return strategy.combine_gradients([G], tf.ones((T,), G.dtype), present, tf.constant(0, tf.int64))[
        0
    ].numpy()


def test_conflicting_pair_matches_hand_computation():
    g1, g2 = np.array([2.0, 0.0]), np.array([-1.0, 1.0])
    # g1 . g2 = -2: g1' = g1 + g2 = [1, 1]; g2' = g2 + (2/4) g1 = [0, 1].
    d = PCGrad(seed=1).aggregate(np.stack([g1, g2])).numpy()
    np.testing.assert_allclose(d, [1.0, 2.0], atol=1e-12)
    # Both projected gradients are orthogonal to the other task's gradient.
    np.testing.assert_allclose([np.dot([1.0, 1.0], g2), np.dot([0.0, 1.0], g1)], [0.0, 0.0])


def test_non_conflicting_pair_is_the_plain_sum():
    G = np.array([[1.0, 2.0, 0.0], [0.5, -0.1, 3.0]])  # g1 . g2 = 0.3 > 0
    strategy = PCGrad(seed=0)
    np.testing.assert_allclose(strategy.aggregate(G).numpy(), G.sum(0), atol=1e-12)
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_three_tasks_match_a_visiting_order(seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(3, 5))
    G[2] = -G[0] + 0.3 * rng.normal(size=5)  # force conflicts
    d = PCGrad(seed=seed).aggregate(G).numpy()
    perms = list(itertools.permutations(range(3)))
    candidates = [_reference(G, orders) for orders in itertools.product(perms, repeat=3)]
    errors = [np.abs(d - c).max() for c in candidates]
    assert min(errors) < 1e-10


def test_order_is_reproducible_for_a_seed_and_advances():
    G = np.random.default_rng(5).normal(size=(4, 6))
    G[3] = -G[0] - G[1]
    a, b = PCGrad(seed=7), PCGrad(seed=7)
    first = [a.aggregate(G).numpy() for _ in range(4)]
    second = [b.aggregate(G).numpy() for _ in range(4)]
    np.testing.assert_array_equal(np.array(first), np.array(second))
    assert int(a.draws.numpy()) == 4


def test_masked_task_has_zero_weight():
    G = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]])
    d = _combine(PCGrad(seed=0), G, present=[True, True, False])
    np.testing.assert_allclose(d, [0.5, 1.5], atol=1e-12)
    strategy = PCGrad(seed=0)
    _combine(strategy, np.array([[1.0, 0.0], [0.0, 0.0]]), present=[True, False])
    np.testing.assert_allclose(strategy.task_weights.numpy(), [1.0, 0.0])


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((2, 3)), np.zeros(3)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([2.0, 4.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([1.0, 2.0])),
        (np.array([[3.0, -1.0]]), np.array([3.0, -1.0])),
    ],
)
def test_degenerate_inputs(G, expected):
    np.testing.assert_allclose(PCGrad(seed=0).aggregate(G).numpy(), expected, atol=1e-12)


def test_combine_gradients_per_variable_in_float32():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 4)).astype("float32"), rng.normal(size=(2, 5)).astype("float32")
    b[1] = -b[0]
    strategy = PCGrad(seed=0)
    strategy.build(["x", "y"])
    out = strategy.combine_gradients(
        [tf.constant(a), tf.constant(b)], tf.ones(2), tf.constant([True, True]), 0
    )
    G = np.concatenate([a.reshape(2, -1), b], axis=1).astype("float64")
    ref = _reference(G, [[0, 1], [0, 1]])
    np.testing.assert_allclose(
        np.concatenate([out[0].numpy().ravel(), out[1].numpy()]), ref, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit(jit_compile):
    strategy = PCGrad(seed=3)
    strategy.build(["a", "b", "c"])
    G = np.random.default_rng(1).normal(size=(3, 7)).astype("float32")
    G[2] = -G[0]

    @tf.function(jit_compile=jit_compile)
    def run(G):
        return strategy.combine_gradients(
            [G], tf.ones(3), tf.constant([True, True, True]), tf.constant(0, tf.int64)
        )[0]

    out = run(tf.constant(G)).numpy()
    eager = PCGrad(seed=3)
    np.testing.assert_allclose(out, eager.aggregate(G.astype("float64")).numpy(), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(strategy.task_weights.numpy()))


def test_serialization_round_trip_keeps_state():
    strategy = get("pcgrad", seed=11, update_every=3, mode="representation")
    strategy.build(["a", "b"])
    strategy.aggregate(np.eye(2))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, PCGrad)
    assert restored.get_config() == strategy.get_config()
    assert restored.get_config()["seed"] == 11
    assert restored.built and restored.task_names == ["a", "b"]
    restored.set_weights(strategy.get_weights())
    assert int(restored.draws.numpy()) == 1


def test_seed_none_is_drawn_and_kept():
    strategy = PCGrad()
    assert isinstance(strategy.seed, int)
    assert PCGrad.from_config(strategy.get_config()).seed == strategy.seed


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="Received: seed="):
        PCGrad(seed=seed)
