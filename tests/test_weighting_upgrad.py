import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import UPGrad, get


def _alpha(G, present=None, **kwargs):
    G = np.asarray(G, np.float64)
    T = len(G)
    strategy = UPGrad(**kwargs)
    strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    alpha, new_state = strategy.weights_from_gram(
        tf.constant(G @ G.T), tf.ones(T, tf.float64), tf.constant(present), tf.constant(0), strategy.state()
    )
    assert new_state == {}
    return alpha.numpy()


def test_hand_case_and_no_conflict_is_the_mean():
    # g1 = [1, 0] projects to [0.5, 0.5]; g2 = [-1, 1] projects to [0, 1].
    np.testing.assert_allclose(UPGrad().aggregate(np.array([[1.0, 0.0], [-1.0, 1.0]])).numpy(), [0.25, 0.75])
    G = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]])
    np.testing.assert_allclose(UPGrad().aggregate(G).numpy(), G.mean(0), atol=1e-12)


@pytest.mark.parametrize("max_exact_tasks", [10, 0])
def test_small_norm_task_is_not_swamped(max_exact_tasks):
    # The hand case with norms a million apart: g1 = [1e-3, 0] projects to [5e-4, 5e-4],
    # g2 = [-1e3, 1e3] to [0, 1e3]; the update still conflicts with neither.
    G = np.array([[1e-3, 0.0], [-1e3, 1e3]])
    d = _alpha(G, max_exact_tasks=max_exact_tasks) @ G
    np.testing.assert_allclose(d, [2.5e-4, 500.00025], rtol=1e-9)
    assert np.all(G @ d > 0)


def test_masked_and_one_task():
    G = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    alpha = _alpha(G, [True, False, True])
    np.testing.assert_allclose(alpha @ G, [0.25, 0.75], atol=1e-12)
    assert alpha[1] == 0
    np.testing.assert_allclose(UPGrad().aggregate(np.array([[2.0, -1.0]])).numpy(), [2.0, -1.0])


@pytest.mark.parametrize(
    "G, expected",
    [
        (np.zeros((3, 2)), np.zeros(2)),
        (np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([1.0, 2.0])),
        (np.array([[1.0, 2.0], [-1.0, -2.0]]), np.zeros(2)),
        (np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([0.5, 1.0])),
        (np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), np.zeros(2)),  # the cone is {0}
    ],
)
def test_degenerate_inputs(G, expected):
    for max_exact_tasks in (10, 0):
        d = UPGrad(max_exact_tasks=max_exact_tasks).aggregate(G).numpy()
        np.testing.assert_allclose(d, expected, atol=1e-12)


def test_config_round_trip():
    strategy = get("upgrad", max_exact_tasks=4)
    strategy.build(["a", "b"])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert isinstance(restored, UPGrad) and restored.get_config() == strategy.get_config()


@pytest.mark.parametrize("value", [-1, 15, 2.0, True])
def test_rejects_bad_arguments(value):
    with pytest.raises(ValueError, match="Received: max_exact_tasks="):
        UPGrad(max_exact_tasks=value)
