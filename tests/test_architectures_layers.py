import keras
import numpy as np
import pytest

from kmtl.architectures.layers import CrossStitch, ExpertGate, ExpertMixture, TaskAttention


def round_trip(layer, inputs):
    """Layer config and weights survive a `.keras`-style serialization round trip."""
    expected = layer(inputs)
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert clone.get_config() == layer.get_config()
    clone(inputs)
    clone.set_weights(layer.get_weights())
    got = clone(inputs)
    for a, b in zip(keras.tree.flatten(got), keras.tree.flatten(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_gate_rows_are_distributions_and_round_trip():
    x = np.random.default_rng(0).normal(size=(5, 4, 3)).astype("float32")
    gate = ExpertGate(3, name="gate")
    weights = np.asarray(gate(x))
    assert weights.shape == (5, 3)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    round_trip(ExpertGate(3), x)


def test_mixture_is_the_gate_weighted_sum_for_vectors_and_maps():
    rng = np.random.default_rng(1)
    gate = np.array([[1.0, 0.0], [0.25, 0.75]], "float32")
    for shape in [(2, 3), (2, 4, 4, 2)]:
        a, b = rng.normal(size=shape).astype("float32"), rng.normal(size=shape).astype("float32")
        mixed = np.asarray(ExpertMixture()([gate, a, b]))
        w = gate.reshape((2, 2) + (1,) * (len(shape) - 1))
        np.testing.assert_allclose(mixed, w[:, 0] * a + w[:, 1] * b, atol=1e-6)


def test_mixture_rejects_mismatched_experts():
    gate = keras.Input((3,))
    with pytest.raises(ValueError, match="weighs 3 experts but 2"):
        ExpertMixture()([gate, keras.Input((4,)), keras.Input((4,))])
    with pytest.raises(ValueError, match="same output shape"):
        ExpertMixture()([keras.Input((2,)), keras.Input((4,)), keras.Input((5,))])


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_gate_needs_a_positive_number_of_experts(value):
    with pytest.raises(ValueError, match="Received: num_experts="):
        ExpertGate(value)


def test_cross_stitch_starts_near_identity_and_mixes():
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(4, 6)).astype("float32") for _ in range(3)]
    unit = CrossStitch(0.8)
    outputs = unit(xs)
    np.testing.assert_allclose(
        unit.alpha.numpy(), [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], atol=1e-7
    )
    np.testing.assert_allclose(np.asarray(outputs[1]), 0.1 * xs[0] + 0.8 * xs[1] + 0.1 * xs[2], atol=1e-6)
    round_trip(CrossStitch(0.7), xs)


def test_cross_stitch_errors():
    with pytest.raises(ValueError, match="self_weight"):
        CrossStitch(0.0)
    with pytest.raises(ValueError, match="two or more"):
        CrossStitch()(keras.Input((3,)))
    with pytest.raises(ValueError, match="same shape"):
        CrossStitch()([keras.Input((3,)), keras.Input((4,))])


def test_task_attention_masks_shared_features():
    rng = np.random.default_rng(3)
    shared = rng.uniform(size=(2, 7, 7, 8)).astype("float32")
    previous = rng.uniform(size=(2, 14, 14, 4)).astype("float32")
    first = TaskAttention(4)
    out = np.asarray(first(shared))
    assert out.shape == shared.shape
    # A sigmoid mask: every output lies between 0 and the shared feature.
    assert np.all(out >= 0) and np.all(out <= shared + 1e-6)
    chained = TaskAttention(8)
    assert tuple(chained([shared, previous]).shape) == shared.shape
    round_trip(TaskAttention(4), shared)
    round_trip(TaskAttention(8), [shared, previous])


def test_task_attention_errors():
    with pytest.raises(ValueError, match="conv feature maps"):
        TaskAttention(4)(keras.Input((16,)))
    with pytest.raises(ValueError, match="Received: filters=0"):
        TaskAttention(0)


def test_options_lists_builder_defaults():
    import kmtl

    assert kmtl.architectures.options("ple") == {
        "num_levels": 2,
        "num_shared_experts": 2,
        "num_task_experts": 1,
        "gate_input": "input",
    }
    assert set(kmtl.architectures.names()) >= {
        "hard_sharing",
        "mmoe",
        "cgc",
        "ple",
        "cross_stitch",
        "mtan",
        "task_routed",
    }
    with pytest.raises(ValueError, match="Unknown architecture"):
        kmtl.architectures.get("moe")
