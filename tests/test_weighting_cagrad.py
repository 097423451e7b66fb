import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import CAGrad, get


def _alpha(strategy, G, present=None):
    G = np.asarray(G, np.float64)
    T = len(G)
    if not strategy.built:
        strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    alpha, new_state = strategy.weights_from_gram(
        tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), tf.constant(0), strategy.state()
    )
    assert new_state == {}
    return alpha.numpy()


@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_c_zero_is_the_mean_gradient(rescale):
    G = np.random.default_rng(0).normal(size=(4, 6))
    np.testing.assert_allclose(CAGrad(c=0.0, rescale=rescale).aggregate(G).numpy(), G.mean(0), atol=1e-12)


def test_two_orthogonal_tasks_hand_case():
    # g0 = [0.5, 0.5]: by symmetry w = [1/2, 1/2], g_w = g0, d = (1 + c) g0.
    G = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(CAGrad(c=0.5, rescale=0).aggregate(G).numpy(), [0.75, 0.75], atol=1e-12)


def test_rescale_divides_the_update():
    rng = np.random.default_rng(2)
    G = rng.normal(size=(3, 5))
    G[2] = -0.8 * G[0] + 0.1 * rng.normal(size=5)
    base = _alpha(CAGrad(c=0.5, rescale=0), G)
    np.testing.assert_allclose(_alpha(CAGrad(c=0.5, rescale=1), G), base / 1.25, rtol=1e-12)
    np.testing.assert_allclose(_alpha(CAGrad(c=0.5, rescale=2), G), base / 1.5, rtol=1e-12)


def test_best_worst_case_of_zero_returns_the_closest_optimum():
    # g1 and g2 are opposite: min_t g_t . d <= 0 for every d, and 0 is reached inside the ball;
    # the optimum closest to g0 = [-1/6, 1/3] is its projection onto {d_x = 0, d_y >= 0}.
    G = np.array([[1.0, 0.0], [-2.0, 0.0], [0.5, 1.0]])
    np.testing.assert_allclose(CAGrad(c=0.5, rescale=0).aggregate(G).numpy(), [0.0, 1.0 / 3.0], atol=1e-12)


def test_masked_task_and_one_task():
    G = np.array([[1.0, 0.0], [0.0, 0.0], [-0.5, 1.0]])
    alpha = _alpha(CAGrad(), G, present=[True, False, True])
    assert alpha[1] == 0.0
    np.testing.assert_allclose(alpha[[0, 2]], _alpha(CAGrad(), G[[0, 2]]), atol=1e-12)
    # One task: d = g (1 + c) / (1 + c^2).
    np.testing.assert_allclose(
        CAGrad().aggregate(np.array([[3.0, -1.0]])).numpy(), np.array([3.0, -1.0]) * 1.4 / 1.16
    )


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((2, 3)), np.zeros(3)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([1.0, 2.0]) * 1.4 / 1.16),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        # A zero gradient counts in g0 (halving it) but not in the worst case.
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([0.5, 1.0]) * 1.4 / 1.16),
    ],
)
def test_degenerate_inputs(G, expected):
    for max_exact_tasks in (10, 0):
        d = CAGrad(max_exact_tasks=max_exact_tasks).aggregate(G).numpy()
        np.testing.assert_allclose(d, expected, atol=1e-9)


def test_config_round_trip_and_defaults():
    strategy = get("cagrad", c=0.7, rescale=2, max_exact_tasks=3, max_iter=30, update_every=4)
    strategy.build(["a", "b"])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, CAGrad) and restored.get_config() == strategy.get_config()
    assert CAGrad().c == 0.4 and CAGrad().rescale == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"c": -0.1},
        {"c": float("nan")},
        {"rescale": 3},
        {"rescale": True},
        {"max_iter": 0},
        {"max_exact_tasks": 15},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        CAGrad(**kwargs)
