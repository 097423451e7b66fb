import keras
import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from kmtl.weighting import MGDA, get


def _alpha(strategy, G, present=None, losses=None):
    G = np.asarray(G, np.float64)
    T = len(G)
    if not strategy.built:
        strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    losses = np.ones(T) if losses is None else np.asarray(losses, np.float64)
    run = tf.function(strategy.weights_from_gram)
    return run(
        tf.constant(G @ G.T), tf.constant(losses), tf.constant(present), tf.constant(0, tf.int64)
    ).numpy()


def test_two_tasks_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(10):
        g1, g2 = rng.normal(size=(2, 5))
        a = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
        np.testing.assert_allclose(_alpha(MGDA(), [g1, g2]), [a, 1 - a], atol=1e-12)
    # A dominated direction: alpha clipped at the vertex of the smaller gradient.
    np.testing.assert_allclose(_alpha(MGDA(), [[1.0, 0.0], [3.0, 0.0]]), [1.0, 0.0])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_min_norm_property_for_more_tasks(seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(4, 6))
    G[3] = -G[0] - 0.5 * G[1]
    K = G @ G.T
    alpha = _alpha(MGDA(), G)
    res = scipy.optimize.minimize(
        lambda x: x @ K @ x,
        np.ones(4) / 4,
        bounds=[(0, 1)] * 4,
        constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    assert abs(alpha.sum() - 1) < 1e-12 and alpha.min() >= 0
    assert alpha @ K @ alpha <= res.fun + 1e-10
    d = alpha @ G
    # Min-norm point: no task's gradient has a smaller inner product with d than |d|^2.
    assert np.min(G @ d) >= d @ d - 1e-8


@pytest.mark.parametrize(
    "normalization, scale",
    [
        ("l2", lambda G, L: np.linalg.norm(G, axis=1)),
        ("loss", lambda G, L: L),
        ("loss+", lambda G, L: L * np.linalg.norm(G, axis=1)),
    ],
)
def test_normalizations_solve_on_scaled_gradients(normalization, scale):
    G = np.array([[3.0, 0.0], [0.0, 0.5]])
    losses = np.array([2.0, 0.25])
    Gn = G / scale(G, losses)[:, None]
    expected = _alpha(MGDA(), Gn)
    np.testing.assert_allclose(
        _alpha(MGDA(normalization=normalization), G, losses=losses), expected, atol=1e-12
    )


def test_masked_task_excluded_and_one_task():
    alpha = _alpha(MGDA(), [[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], present=[True, False, True])
    np.testing.assert_allclose(alpha, [0.8, 0.0, 0.2], atol=1e-9)
    np.testing.assert_allclose(_alpha(MGDA(), [[1.0, 0.0], [0.0, 0.0]], present=[True, False]), [1.0, 0.0])
    np.testing.assert_allclose(MGDA().aggregate(np.array([[2.0, -1.0]])).numpy(), [2.0, -1.0])


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]), np.array([1.0, 2.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.zeros(2)),  # Pareto stationary: no common descent
    ],
)
def test_degenerate_inputs(G, expected):
    np.testing.assert_allclose(MGDA().aggregate(G).numpy(), expected, atol=1e-9)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit_in_float32(jit_compile):
    strategy = MGDA()
    strategy.build(["a", "b", "c"])
    G = np.random.default_rng(4).normal(size=(3, 2, 4)).astype("float32")

    @tf.function(jit_compile=jit_compile)
    def run(g):
        return strategy.combine_gradients([g], tf.ones(3), tf.constant([True, True, True]), 0)[0]

    out = run(tf.constant(G)).numpy()
    alpha = _alpha(MGDA(), G.reshape(3, -1).astype(np.float64))
    np.testing.assert_allclose(out, np.tensordot(alpha, G, 1), atol=1e-5)
    np.testing.assert_allclose(strategy.task_weights.numpy(), alpha, atol=1e-5)


def test_mgda_ub_is_the_representation_mode_and_config_round_trip():
    strategy = get("mgda", normalization="loss+", max_iter=40, mode="representation")
    assert strategy.mode == "representation" and strategy.gram_based
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, MGDA) and restored.get_config() == strategy.get_config()
    assert MGDA().mode == "parameters" and MGDA().normalization == "none"


@pytest.mark.parametrize(
    "kwargs", [{"normalization": "L2"}, {"max_iter": 0}, {"max_iter": 2.5}, {"mode": "activations"}]
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        MGDA(**kwargs)
