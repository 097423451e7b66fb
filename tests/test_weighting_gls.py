import numpy as np
import pytest
from _weighting_helpers import combine_stateless

from kmtl.weighting import GLS, get


def _build(tasks=("a", "b", "c"), **kwargs):
    strategy = GLS(**kwargs)
    strategy.build(list(tasks))
    return strategy


def test_total_is_the_geometric_mean_and_its_gradient():
    strategy = get("gls")
    assert isinstance(strategy, GLS)
    strategy.build(["a", "b", "c"])
    values = np.array([0.5, 2.0, 8.0])
    total, weights, grad = combine_stateless(strategy, values, [True, True, True])
    geometric_mean = (0.5 * 2.0 * 8.0) ** (1 / 3)  # = 2
    np.testing.assert_allclose(total, geometric_mean, rtol=1e-6)
    # d/dL_t (prod L)^(1/T) = (prod L)^(1/T) / (T L_t)
    expected = geometric_mean / (3 * values)
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_replica_shares_get_the_weights_of_the_global_values():
    strategy = _build(("a", "b"))
    _, weights, grad = combine_stateless(strategy, [0.1, 0.2], [True, True], values=[0.5, 2.0])
    np.testing.assert_allclose(weights, [1.0, 0.25], rtol=1e-6)  # sqrt(0.5 * 2) / (2 L_t)
    np.testing.assert_allclose(grad, weights, rtol=1e-6)


def test_log_space_is_stable_for_many_small_losses():
    strategy = _build(tuple(f"t{i}" for i in range(40)))
    values = np.full(40, 1e-3, np.float32)  # the plain product underflows float32
    total, weights, _ = combine_stateless(strategy, values, [True] * 40)
    np.testing.assert_allclose(total, 1e-3, rtol=1e-4)
    np.testing.assert_allclose(weights, 1 / 40, rtol=1e-4)


def test_masked_task_is_left_out_without_log_of_zero():
    strategy = _build()
    total, weights, grad = combine_stateless(strategy, [0.5, 0.0, 2.0], [True, False, True])
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)  # sqrt(0.5 * 2)
    np.testing.assert_allclose(grad, [1.0, 0.0, 0.25], rtol=1e-6)
    np.testing.assert_allclose(weights, [1.0, 0.0, 0.25], rtol=1e-6)
    total, weights, _ = combine_stateless(strategy, [0.0, 0.0, 0.0], [False, False, False])
    assert total == 0.0 and np.isfinite(weights).all()


@pytest.mark.parametrize("eps", [0.0, float("nan"), None, True])
def test_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0. Received: eps="):
        GLS(eps=eps)
