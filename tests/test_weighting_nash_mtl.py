import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import NashMTL, get


def _alpha(G, present=None, **kwargs):
    G = np.asarray(G, np.float64)
    T = len(G)
    strategy = NashMTL(**kwargs)
    strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    run = tf.function(strategy.weights_from_gram)
    alpha, new_state = run(
        tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), tf.constant(0), strategy.state()
    )
    assert new_state == {}
    return alpha.numpy()


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_alpha_solves_the_bargaining_equations(num_tasks):
    rng = np.random.default_rng(num_tasks)
    G = rng.normal(size=(num_tasks, 12)) * 10.0 ** rng.uniform(-3, 3, size=(num_tasks, 1))
    alpha = _alpha(G, ridge=1e-12)
    K = G @ G.T
    assert np.all(alpha > 0)
    np.testing.assert_allclose((K @ alpha) * alpha, 1.0, rtol=1e-10)
    d = alpha @ G
    np.testing.assert_allclose(d @ d, num_tasks, rtol=1e-10)


def test_orthogonal_gradients_get_inverse_norms():
    np.testing.assert_allclose(_alpha([[2.0, 0.0], [0.0, 0.5]]), [0.5, 2.0], rtol=1e-7)
    # Norms a million apart: each task is solved on its own scale, |d| = sqrt(2).
    alpha = _alpha([[1e-3, 0.0], [0.0, 1e3]])
    np.testing.assert_allclose(alpha, [1e3, 1e-3], rtol=1e-7)


def test_masked_zero_gradient_and_one_task():
    G = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    for present in ([True, False, True], [True, True, True]):
        # An absent task or a zero gradient (no direction to bargain over) gets weight 0.
        alpha = _alpha(G, present, ridge=1e-12)
        assert alpha[1] == 0
        sub = G[[0, 2]]
        np.testing.assert_allclose(sub @ sub.T @ alpha[[0, 2]], 1.0 / alpha[[0, 2]], rtol=1e-10)
    np.testing.assert_allclose(NashMTL().aggregate(np.array([[3.0, 4.0]])).numpy(), [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.sqrt(2) * np.array([1.0, 2.0]) / np.sqrt(5)),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        # No solution (Pareto stationary pair): the pair cancels, the third task bargains alone.
        (np.array([[1.0, 0.0], [-3.0, 0.0], [0.0, 2.0]]), np.array([0.0, 1.0])),
    ],
)
def test_degenerate_inputs(G, expected):
    np.testing.assert_allclose(NashMTL().aggregate(G).numpy(), expected, atol=1e-6)


def test_config_round_trip():
    strategy = get("nash_mtl", max_iter=20, ridge=1e-6, update_every=25)
    strategy.build(["a", "b"])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, NashMTL) and restored.get_config() == strategy.get_config()


@pytest.mark.parametrize("kwargs", [{"max_iter": 0}, {"ridge": 0.0}, {"ridge": 1.0}, {"ridge": "1e-8"}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        NashMTL(**kwargs)
