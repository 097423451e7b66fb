import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import MGDA, get


def _alpha(strategy, G, present=None, losses=None):
    G = np.asarray(G, np.float64)
    T = len(G)
    if not strategy.built:
        strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    losses = np.ones(T) if losses is None else np.asarray(losses, np.float64)
    alpha, new_state = strategy.weights_from_gram(
        tf.constant(G @ G.T),
        tf.constant(losses),
        tf.constant(present),
        tf.constant(0, tf.int64),
        strategy.state(),
    )
    assert new_state == {}
    return alpha.numpy()


def test_two_tasks_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(10):
        g1, g2 = rng.normal(size=(2, 5))
        a = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
        np.testing.assert_allclose(_alpha(MGDA(), [g1, g2]), [a, 1 - a], atol=1e-12)
    # A dominated direction: alpha clipped at the vertex of the smaller gradient.
    np.testing.assert_allclose(_alpha(MGDA(), [[1.0, 0.0], [3.0, 0.0]]), [1.0, 0.0], atol=1e-15)


def test_three_orthogonal_tasks_weights_are_inverse_squared_norms():
    # Orthogonal gradients: alpha_t ~ 1 / |g_t|^2, for norms a million apart too.
    norms = np.array([1e-3, 1.0, 1e3])
    alpha = _alpha(MGDA(), np.diag(norms))
    np.testing.assert_allclose(alpha, norms**-2 / np.sum(norms**-2), rtol=1e-12)


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
    np.testing.assert_allclose(alpha, [0.8, 0.0, 0.2], atol=1e-12)
    np.testing.assert_allclose(_alpha(MGDA(), [[1.0, 0.0], [0.0, 0.0]], present=[True, False]), [1.0, 0.0])
    np.testing.assert_allclose(MGDA().aggregate(np.array([[2.0, -1.0]])).numpy(), [2.0, -1.0])


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]), np.array([1.0, 2.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.zeros(2)),  # Pareto stationary: no common descent
        (np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), np.zeros(2)),  # more tasks than the rank
    ],
)
def test_degenerate_inputs(G, expected):
    for max_exact_tasks in (10, 0):
        d = MGDA(max_exact_tasks=max_exact_tasks).aggregate(G).numpy()
        np.testing.assert_allclose(d, expected, atol=1e-12)


def test_mgda_ub_is_the_representation_mode_and_config_round_trip():
    strategy = get("mgda", normalization="loss+", max_exact_tasks=4, max_iter=40, mode="representation")
    assert strategy.mode == "representation" and strategy.gram_based
    strategy.build(["a", "b"])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, MGDA) and restored.get_config() == strategy.get_config()
    assert MGDA().mode == "parameters" and MGDA().normalization == "none"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"normalization": "L2"},
        {"max_iter": 0},
        {"max_iter": 2.5},
        {"max_exact_tasks": -1},
        {"mode": "activations"},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        MGDA(**kwargs)
