import keras
import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from kmtl.weighting import CAGrad, get


def _alpha(strategy, G, present=None):
    G = np.asarray(G, np.float64)
    T = len(G)
    if not strategy.built:
        strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    run = tf.function(strategy.weights_from_gram)
    return run(tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), 0).numpy()


def _reference(G, c, rescale=1):
    """The paper's dual, solved with scipy (several starts)."""
    T = len(G)
    K = G @ G.T
    b = np.ones(T) / T
    radius = c * np.sqrt(b @ K @ b)
    objective = lambda w: w @ K @ b + radius * np.sqrt(w @ K @ w + 1e-18)  # noqa: E731
    starts = [b] + list(np.eye(T))
    results = [
        scipy.optimize.minimize(
            objective,
            x0,
            bounds=[(0, 1)] * T,
            method="SLSQP",
            constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
            options={"ftol": 1e-15, "maxiter": 500},
        )
        for x0 in starts
    ]
    w = min(results, key=lambda r: r.fun).x
    gw = w @ G
    d = G.mean(0) + radius / np.linalg.norm(gw) * gw
    return d / {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]


@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_c_zero_is_the_mean_gradient(rescale):
    G = np.random.default_rng(0).normal(size=(4, 6))
    np.testing.assert_allclose(CAGrad(c=0.0, rescale=rescale).aggregate(G).numpy(), G.mean(0), atol=1e-12)


@pytest.mark.parametrize("num_tasks, c, rescale", [(2, 0.4, 1), (3, 0.4, 1), (4, 0.8, 0), (5, 0.2, 2)])
def test_matches_scipy_solution_of_the_dual(num_tasks, c, rescale):
    rng = np.random.default_rng(num_tasks)
    G = rng.normal(size=(num_tasks, 7))
    G[0] -= 1.5 * G[1]
    d = _alpha(CAGrad(c=c, rescale=rescale), G) @ G
    np.testing.assert_allclose(d, _reference(G, c, rescale), atol=1e-6)


def test_result_stays_in_the_ball_and_improves_the_worst_task():
    rng = np.random.default_rng(7)
    G = rng.normal(size=(3, 5))
    G[2] = -0.8 * G[0] + 0.1 * rng.normal(size=5)
    c = 0.5
    d = _alpha(CAGrad(c=c, rescale=0), G) @ G
    g0 = G.mean(0)
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9)
    assert np.min(G @ d) >= np.min(G @ g0) - 1e-12


def test_masked_task_and_one_task():
    G = np.array([[1.0, 0.0], [0.0, 0.0], [-0.5, 1.0]])
    alpha = _alpha(CAGrad(), G, present=[True, False, True])
    assert alpha[1] == 0.0
    np.testing.assert_allclose(alpha[[0, 2]] @ G[[0, 2]], _reference(G[[0, 2]], 0.4), atol=1e-7)
    # One task: d = g (1 + c) / (1 + c^2).
    np.testing.assert_allclose(
        CAGrad().aggregate(np.array([[3.0, -1.0]])).numpy(), np.array([3.0, -1.0]) * 1.4 / 1.16
    )


@pytest.mark.parametrize(
    "G", [np.zeros((2, 3)), np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([[1.0, 2.0], [-1.0, -2.0]])]
)
def test_degenerate_inputs_are_finite(G):
    strategy = CAGrad()
    d = strategy.aggregate(G).numpy()
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(strategy.task_weights.numpy()))
    if np.allclose(G.sum(0), 0):
        np.testing.assert_allclose(d, 0.0, atol=1e-12)
    else:
        np.testing.assert_allclose(d, G[0] * 1.4 / 1.16, atol=1e-9)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit(jit_compile):
    strategy = CAGrad()
    strategy.build(["a", "b", "c"])
    G = np.random.default_rng(3).normal(size=(3, 6)).astype("float32")

    @tf.function(jit_compile=jit_compile)
    def run(g):
        return strategy.combine_gradients([g], tf.ones(3), tf.constant([True, True, True]), 0)[0]

    np.testing.assert_allclose(run(tf.constant(G)).numpy(), _reference(G.astype(np.float64), 0.4), atol=1e-5)


def test_serialization_round_trip():
    strategy = get("cagrad", c=0.7, rescale=2, max_iter=30, update_every=4)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, CAGrad) and restored.get_config() == strategy.get_config()
    assert CAGrad().c == 0.4 and CAGrad().rescale == 1


@pytest.mark.parametrize("kwargs", [{"c": -0.1}, {"c": float("nan")}, {"rescale": 3}, {"max_iter": 0}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        CAGrad(**kwargs)
