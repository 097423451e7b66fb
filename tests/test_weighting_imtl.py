import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import IMTL, get


def _alpha(G, present=None, dtype="float64"):
    G = np.asarray(G, dtype)
    T = len(G)
    strategy = IMTL()
    strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    alpha, new_state = strategy.weights_from_gram(
        tf.constant(G @ G.T), tf.ones(T, G.dtype), tf.constant(present), tf.constant(0), strategy.state()
    )
    assert new_state == {}
    return alpha.numpy().astype(np.float64)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_equal_projections_onto_every_unit_gradient(num_tasks):
    rng = np.random.default_rng(num_tasks)
    for _ in range(3):
        G = rng.normal(size=(num_tasks, 8)) * 10.0 ** rng.uniform(-3, 3, size=(num_tasks, 1))
        alpha = _alpha(G)
        projections = (G / np.linalg.norm(G, axis=1, keepdims=True)) @ (alpha @ G)
        np.testing.assert_allclose(projections, projections[0], rtol=1e-9)
        np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-12)


def test_paper_closed_form_for_two_tasks():
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=(2, 4))
    u1, u2 = g1 / np.linalg.norm(g1), g2 / np.linalg.norm(g2)
    a2 = (g1 @ (u1 - u2)) / ((g1 - g2) @ (u1 - u2))
    np.testing.assert_allclose(_alpha([g1, g2]), [1 - a2, a2], atol=1e-12)


def test_more_tasks_than_rank_is_the_least_squares_fit():
    # Three directions in the plane: no non-zero update has equal projections. The update is
    # the least-squares fit of u_t . d = 1, d = (a, a) with a = 1/2 + sqrt(2)/4 by symmetry,
    # scaled so that the weights sum to 1 (not the zero update of the exact system).
    G = np.array([[2.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    alpha = _alpha(G)
    d = alpha @ G
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-12)
    np.testing.assert_allclose(d[0], d[1], rtol=1e-12)
    units = G / np.linalg.norm(G, axis=1, keepdims=True)
    fit = np.linalg.lstsq(units, np.ones(3), rcond=None)[0]
    np.testing.assert_allclose(fit, [0.5 + np.sqrt(2) / 4] * 2, rtol=1e-12)
    np.testing.assert_allclose(d / np.linalg.norm(d), fit / np.linalg.norm(fit), rtol=1e-12)
    # A float32 Gram matrix with a near-dependent row: the rank is decided at float32 precision.
    H = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1e-5]])
    alpha32 = _alpha(H, dtype="float32")
    assert np.isfinite(alpha32).all() and abs(alpha32.sum() - 1) < 1e-5
    np.testing.assert_allclose(_alpha(H[:, :2], dtype="float32"), alpha32, rtol=1e-4)


def test_masked_and_one_task():
    G = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    np.testing.assert_allclose(_alpha(G, [True, False, True]), [0.75, 0.0, 0.25], atol=1e-12)
    np.testing.assert_allclose(IMTL().aggregate(np.array([[2.0, 1.0]])).numpy(), [2.0, 1.0])


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([1.0, 2.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        (np.array([[1.0, 2.0], [-3.0, -6.0]]), np.zeros(2)),  # opposite: alpha ~ 1 / |g_t|
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([1.0, 2.0])),  # zero gradient: no direction
    ],
)
def test_degenerate_inputs(G, expected):
    np.testing.assert_allclose(IMTL().aggregate(G).numpy(), expected, atol=1e-12)


def test_config_round_trip():
    strategy = get("imtl", mode="representation", update_every=2)
    strategy.build(["a", "b"])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, IMTL) and restored.get_config() == strategy.get_config()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Received: update_every=0"):
        IMTL(update_every=0)
