import numpy as np
import pytest
import tensorflow as tf

from kmtl.weighting import GradDrop, _random, get


def _combine(strategy, grads, present=None):
    """One committed step on stacked gradients; returns the combined arrays."""
    T = grads[0].shape[0]
    if not strategy.built:
        strategy.build([f"t{i}" for i in range(T)])
    present = [True] * T if present is None else present
    combined, alpha, new_state = strategy.combine_gradients(
        [tf.constant(g) for g in grads], tf.ones(T), tf.constant(present), 0, strategy.state()
    )
    strategy.commit({**new_state, "task_weights": alpha})
    return [g.numpy() for g in combined]


def test_coordinates_without_conflict_are_kept():
    G = np.array([[1.0, 2.0, -1.0, 0.0], [3.0, 1.0, -2.0, 5.0]])
    for seed in range(5):
        np.testing.assert_allclose(GradDrop(seed=seed).aggregate(G).numpy(), G.sum(0))


def test_hand_case_against_the_drawn_noise():
    G = np.array([[3.0, -1.0, 2.0], [-1.0, 1.0, -2.0]])  # P = (0.75, 0.5, 0.5)
    strategy = get("graddrop", seed=4, mode="parameters")
    d = _combine(strategy, [G])[0]
    noise = _random.uniform(_random.key(4, 0), (3,), stream=0).numpy()
    purity = np.array([0.75, 0.5, 0.5])
    keep = np.where(G > 0, purity > noise, purity < noise)
    np.testing.assert_allclose(d, (keep * G).sum(0))
    mass = np.abs(keep * G).sum(1) / np.abs(G).sum(1)
    np.testing.assert_allclose(strategy.task_weights.numpy(), mass, rtol=1e-6)
    assert int(strategy.draws.numpy()) == 1


def test_conflicting_coordinates_keep_one_sign_with_its_probability():
    n = 4000
    G = np.stack([np.full(n, 3.0), np.full(n, -1.0)])  # purity P = 0.5 (1 + 2/4) = 0.75
    strategy = GradDrop(seed=1, mode="parameters")
    d = _combine(strategy, [G])[0]
    assert set(np.unique(d)) <= {3.0, -1.0}
    assert abs(np.mean(d == 3.0) - 0.75) < 0.03
    weights = strategy.task_weights.numpy()
    np.testing.assert_allclose(weights, [np.mean(d == 3.0), np.mean(d == -1.0)], atol=1e-6)


def test_leak_keeps_a_fraction_of_dropped_gradients():
    G = np.array([[2.0], [-2.0]])
    d = GradDrop(leak=0.25, seed=0).aggregate(G).numpy()
    # One sign kept fully, the other at 0.25: +-(2 - 0.5).
    np.testing.assert_allclose(np.abs(d), [1.5])


def test_representation_mode_uses_batch_summed_signs():
    # Task 0's per-example gradients disagree in sign but sum to +1; task 1 sums to +2: no conflict.
    g0 = np.array([[3.0, 1.0], [-2.0, -1.0]])
    g1 = np.array([[1.0, 1.0], [1.0, 1.0]])
    grads = [np.stack([g0, g1])]  # [T, batch, features]
    out = _combine(GradDrop(seed=0), grads)[0]
    np.testing.assert_allclose(out[:, 0], g0[:, 0] + g1[:, 0])
    # Feature 1: sums 0 (no sign: dropped) and +2 (kept).
    np.testing.assert_allclose(out[:, 1], g1[:, 1])


def test_aggregate_reads_columns_in_representation_mode_too():
    G = np.random.default_rng(0).normal(size=(3, 7))
    representation, parameters = GradDrop(seed=2), GradDrop(seed=2, mode="parameters")
    np.testing.assert_array_equal(representation.aggregate(G).numpy(), parameters.aggregate(G).numpy())


def test_masked_task_takes_no_part_in_the_purity():
    strategy = GradDrop(seed=0, mode="parameters")
    G = np.array([[1.0, -2.0], [9.0, 9.0], [-1.0, -1.0]])
    out = _combine(strategy, [G], present=[True, False, True])[0]
    # With task 1 masked, coordinate 1 has no conflict; coordinate 0 keeps one of +1 / -1.
    assert out[1] == -3.0 and out[0] in (1.0, -1.0)
    assert strategy.task_weights.numpy()[1] == 0


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_steps_draw_the_same_masks_as_eager_ones(jit_compile):
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(3, 8, 5)).astype("float32"), rng.normal(size=(3, 8)).astype("float32")]
    eager = GradDrop(seed=5)
    first = _combine(eager, grads)
    strategy = GradDrop(seed=5)
    strategy.build(["a", "b", "c"])

    @tf.function(jit_compile=jit_compile)
    def run(a, b):
        combined, alpha, new_state = strategy.combine_gradients(
            [a, b], tf.ones(3), tf.constant([True] * 3), 0, strategy.state()
        )
        strategy.commit({**new_state, "task_weights": alpha})
        return combined

    out = run(tf.constant(grads[0]), tf.constant(grads[1]))
    for o, e in zip(out, first, strict=True):
        np.testing.assert_allclose(o.numpy(), e, rtol=1e-6)
    second = run(tf.constant(grads[0]), tf.constant(grads[1]))
    assert not np.allclose(second[0].numpy(), out[0].numpy())  # a new draw every step
    assert int(strategy.draws.numpy()) == 2


def test_default_mode():
    assert GradDrop().mode == "representation" and not GradDrop.gram_based
    with pytest.raises(ValueError, match="needs the full per-task gradients"):
        GradDrop(engine="gram")


@pytest.mark.parametrize("kwargs", [{"leak": -0.1}, {"leak": 1.1}, {"leak": True}, {"seed": "x"}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        GradDrop(**kwargs)
