import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import GradVac, _random, get


def _built(tasks=2, **kwargs):
    strategy = GradVac(seed=kwargs.pop("seed", 0), **kwargs)
    strategy.build([f"t{i}" for i in range(tasks)])
    return strategy


def _run(strategy, G, present=None, commit=True):
    """One committed step on stacked gradients `G`; returns the update."""
    G = np.asarray(G, np.float64)
    T = len(G)
    present = [True] * T if present is None else present
    combined, alpha, new_state = strategy.combine_gradients(
        [tf.constant(G)], tf.ones(T, tf.float64), tf.constant(present), 0, strategy.state()
    )
    if commit:
        strategy.commit({**new_state, "task_weights": alpha})
    return combined[0].numpy()


def test_hand_case_reaches_the_target_similarity():
    strategy = _built(beta=0.5)
    strategy.targets.assign([[0.0, 0.5], [0.5, 0.0]])
    g1, g2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # cos = 0 < target 0.5
    d = _run(strategy, [g1, g2])
    # g1' = g1 + |g1| (0.5 * 1 - 0) / (|g2| sqrt(0.75)) g2 = [1, 1/sqrt(3)], symmetric for g2.
    np.testing.assert_allclose(d, [1 + 1 / np.sqrt(3), 1 + 1 / np.sqrt(3)], atol=1e-12)
    g1p = np.array([1.0, 1 / np.sqrt(3)])
    np.testing.assert_allclose(g1p @ g2 / np.linalg.norm(g1p), 0.5)
    # EMA of the observed cosine (0): 0.5 * 0.5 + 0.5 * 0.
    np.testing.assert_allclose(strategy.targets.numpy(), [[0.0, 0.25], [0.25, 0.0]])
    assert int(strategy.draws.numpy()) == 1


def test_zero_targets_reduce_to_pcgrad_on_conflicts():
    strategy = get("gradvac", beta=0.01, seed=0)
    strategy.build(["a", "b"])
    np.testing.assert_allclose(_run(strategy, [[1.0, 0.0], [-1.0, 1.0]]), [0.5, 1.5], atol=1e-12)
    c = -1 / np.sqrt(2)
    np.testing.assert_allclose(strategy.targets.numpy(), 0.01 * c * (1 - np.eye(2)), rtol=1e-6)


def test_similarity_above_target_is_left_alone():
    strategy = _built()
    G = np.array([[1.0, 0.2], [0.8, 1.0]])
    np.testing.assert_allclose(_run(strategy, G), G.sum(0), atol=1e-12)


def test_three_tasks_follow_the_drawn_order():
    # Task 0 is steered towards tasks 1 and 2 in the order of the draw; check against NumPy.
    G = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.6, 0.0, 0.8]])
    target = 0.875  # exact in float32 (the targets are stored as float32)
    strategy = _built(tasks=3, beta=0.1, seed=3)
    strategy.targets.assign(np.full((3, 3), target) * (1 - np.eye(3)))
    order = _random.orders(_random.key(3, 0), 3).numpy()
    expected = np.zeros(3)
    for i in range(3):
        g = G[i].copy()
        for j in order[i]:
            if j == i:
                continue
            cos = g @ G[j] / (np.linalg.norm(g) * np.linalg.norm(G[j]))
            if cos < target:
                step = np.linalg.norm(g) * (target * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - target**2))
                g = g + step / (np.linalg.norm(G[j]) * np.sqrt(1 - target**2)) * G[j]
        expected += g
    np.testing.assert_allclose(_run(strategy, G), expected, rtol=1e-9)


def test_masked_task_keeps_its_targets():
    strategy = _built(tasks=3)
    strategy.targets.assign(np.full((3, 3), 0.3) * (1 - np.eye(3)))
    G = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    _run(strategy, G, [True, False, True])
    targets = strategy.targets.numpy()
    np.testing.assert_allclose(targets[1], [0.3, 0.0, 0.3], rtol=1e-6)
    np.testing.assert_allclose(targets[:, 1], [0.3, 0.0, 0.3], rtol=1e-6)
    assert strategy.task_weights.numpy()[1] == 0
    np.testing.assert_allclose(targets[0, 2], 0.99 * 0.3, rtol=1e-6)


def test_state_is_stable_over_many_steps():
    strategy = _built(tasks=3, beta=0.2, seed=4)
    rng = np.random.default_rng(0)
    for _ in range(50):
        G = rng.normal(size=(3, 6))
        G[1] = -G[0] + 0.1 * G[1]
        assert np.all(np.isfinite(_run(strategy, G)))
    targets = strategy.targets.numpy()
    assert np.all(np.abs(targets) <= 1) and targets[0, 1] < -0.5
    assert int(strategy.draws.numpy()) == 50


@pytest.mark.parametrize(
    "kwargs", [{"beta": 0.0}, {"beta": 1.5}, {"beta": True}, {"seed": -2}, {"seed": 1.0}]
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        GradVac(**kwargs)
