import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import IMTL, get


def _alpha(G, present=None):
    G = np.asarray(G, np.float64)
    T = len(G)
    strategy = IMTL()
    strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    return strategy.weights_from_gram(
        tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), 0
    ).numpy()


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_equal_projections_onto_every_unit_gradient(num_tasks):
    rng = np.random.default_rng(num_tasks)
    for _ in range(5):
        G = rng.normal(size=(num_tasks, 8)) * rng.uniform(0.1, 10, size=(num_tasks, 1))
        alpha = _alpha(G)
        d = alpha @ G
        projections = (G / np.linalg.norm(G, axis=1, keepdims=True)) @ d
        np.testing.assert_allclose(projections, projections[0], rtol=1e-9)
        np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-12)


def test_paper_closed_form_for_two_tasks():
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=(2, 4))
    u1, u2 = g1 / np.linalg.norm(g1), g2 / np.linalg.norm(g2)
    a2 = (g1 @ (u1 - u2)) / ((g1 - g2) @ (u1 - u2))
    np.testing.assert_allclose(_alpha([g1, g2]), [1 - a2, a2], atol=1e-12)


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
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([1.0, 2.0])),  # zero gradient: no direction
    ],
)
def test_degenerate_inputs(G, expected):
    strategy = IMTL()
    np.testing.assert_allclose(strategy.aggregate(G).numpy(), expected, atol=1e-9)
    assert np.all(np.isfinite(strategy.task_weights.numpy()))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_and_jit(jit_compile):
    strategy = IMTL()
    strategy.build(["a", "b", "c"])
    G = np.random.default_rng(1).normal(size=(3, 4, 2)).astype("float32")

    @tf.function(jit_compile=jit_compile)
    def run(g):
        return strategy.combine_gradients([g], tf.ones(3), tf.constant([True, True, True]), 0)[0]

    out = run(tf.constant(G)).numpy().ravel()
    flat = G.reshape(3, -1).astype(np.float64)
    projections = (flat / np.linalg.norm(flat, axis=1, keepdims=True)) @ out
    np.testing.assert_allclose(projections, projections[0], rtol=1e-4)


def test_serialization_round_trip():
    strategy = get("imtl", mode="representation", update_every=2)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, IMTL) and restored.get_config() == strategy.get_config()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Received: update_every=0"):
        IMTL(update_every=0)
