import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import GradNorm, get


def _step(strategy, G, losses, present=None, commit=True):
    """One step on `G`'s Gram matrix; commits the new state. Returns alpha."""
    G = np.asarray(G, np.float32)
    T = len(G)
    if not strategy.built:
        strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    alpha, new_state = strategy.weights_from_gram(
        tf.constant(G @ G.T), tf.constant(losses, tf.float32), tf.constant(present), 0, strategy.state()
    )
    if commit:
        strategy.commit({**new_state, "task_weights": alpha})
    return alpha.numpy()


def test_weight_update_direction_on_a_hand_case():
    strategy = get("gradnorm", alpha=1.5, learning_rate=0.1)
    assert strategy.level == "gradient" and strategy.gram_based
    G = np.eye(2)  # equal gradient norms 1
    alpha = _step(strategy, G, [1.0, 1.0])  # records L(0) = [1, 1]; weighted norms equal targets
    np.testing.assert_allclose(alpha, [1.0, 1.0])
    np.testing.assert_allclose(strategy.learned_weights.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(strategy.initial_losses.numpy(), [1.0, 1.0])
    # Task 0 trains slower (loss ratio 1 vs 0.5): r = [4/3, 2/3], targets = [1.54, 0.54] vs norms [1, 1].
    alpha = _step(strategy, G, [1.0, 0.5])
    np.testing.assert_allclose(alpha, [1.0, 1.0])  # the update uses the weights before the step
    np.testing.assert_allclose(strategy.learned_weights.numpy(), [1.1, 0.9], rtol=1e-6)
    np.testing.assert_allclose(_step(strategy, G, [1.0, 0.5]), [1.1, 0.9], rtol=1e-6)


def test_gradient_scaled_by_norms_and_renormalised():
    strategy = GradNorm(alpha=0.0, learning_rate=0.1)
    _step(strategy, [[1.0, 0.0], [0.0, 4.0]], [1.0, 1.0])
    # grad = sign(w n - mean) n / mean(n) = [-0.4, 1.6]; w = [1.04, 0.84] * 2 / 1.88.
    np.testing.assert_allclose(strategy.learned_weights.numpy(), np.array([1.04, 0.84]) * 2 / 1.88, rtol=1e-6)
    assert abs(strategy.learned_weights.numpy().sum() - 2) < 1e-6
    np.testing.assert_allclose(
        strategy.aggregate(np.array([[1.0, 0.0], [0.0, 4.0]])).numpy(),
        np.array([1.04, 3.36]) * 2 / 1.88,
        rtol=1e-6,
    )


def test_balances_gradient_norms_over_steps_in_a_compiled_step():
    strategy = GradNorm(alpha=0.0, learning_rate=0.02)
    strategy.build(["a", "b"])
    G = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32)

    @tf.function(jit_compile=True)
    def run(gram):
        alpha, new_state = strategy.weights_from_gram(
            gram, tf.ones(2), tf.constant([True, True]), 0, strategy.state()
        )
        strategy.commit({**new_state, "task_weights": alpha})

    for _ in range(200):
        run(tf.constant(G @ G.T))
    w = strategy.learned_weights.numpy()
    np.testing.assert_allclose(w[0] * 1.0, w[1] * 3.0, rtol=0.05)
    np.testing.assert_allclose(w.sum(), 2.0, rtol=1e-5)


def test_masked_task_state_is_untouched_and_rejected_steps_change_nothing():
    strategy = GradNorm(learning_rate=0.1)
    alpha = _step(strategy, [[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], [2.0, 0.0, 1.0], [True, False, True])
    assert alpha[1] == 0
    np.testing.assert_allclose(strategy.initial_losses.numpy(), [2.0, 0.0, 1.0])
    np.testing.assert_allclose(strategy.seen.numpy(), [1.0, 0.0, 1.0])
    assert strategy.learned_weights.numpy()[1] == 1.0
    np.testing.assert_allclose(strategy.learned_weights.numpy().sum(), 3.0, rtol=1e-6)
    # A step that is not committed does not record an initial loss.
    _step(strategy, np.eye(3), [2.0, 5.0, 1.0], commit=False)
    assert strategy.seen.numpy()[1] == 0.0
    # The task's first committed labelled batch sets its initial loss.
    _step(strategy, np.eye(3), [2.0, 0.7, 1.0])
    np.testing.assert_allclose(strategy.initial_losses.numpy(), [2.0, 0.7, 1.0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": -1.0},
        {"alpha": float("inf")},
        {"learning_rate": 0.0},
        {"learning_rate": "0.1"},
        {"alpha": True},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be a finite number.*Received:"):
        GradNorm(**kwargs)
