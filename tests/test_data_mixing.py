"""Tests of kmtl.data.mix: samplers, masks, routed inputs, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kmtl.data.mixing import annealed_probabilities, mix

SIZES = {"digit": 800, "item": 200}


def task_dataset(task, size, value, shape=(4, 4, 1), label_dtype="int64"):
    """Unbatched `(x, {task: y})`: x filled with `value`, y = 1 + index % 9 (never 0)."""
    x = np.full((size, *shape), value, np.float32)
    y = (1 + np.arange(size) % 9).astype(label_dtype)
    return tf.data.Dataset.from_tensor_slices((x, {task: y})).shuffle(size, seed=int(value))


def two_tasks(**kwargs):
    return {
        "digit": task_dataset("digit", SIZES["digit"], 1.0, **kwargs),
        "item": task_dataset("item", SIZES["item"], 2.0, **kwargs),
    }


def collect(dataset):
    batches = [tf.nest.map_structure(lambda t: t.numpy(), b) for b in dataset]
    x = [b[0] for b in batches]
    y = {t: np.concatenate([b[1][t] for b in batches]) for t in batches[0][1]}
    mask = {t: np.concatenate([b[2][t] for b in batches]) for t in batches[0][2]}
    return batches, x, y, mask


@pytest.mark.parametrize("sampler", ["uniform", "proportional", "annealed", "round_robin"])
def test_every_task_key_present_and_masks_zero_exactly_where_no_label(sampler):
    stream = mix(two_tasks(), sampler=sampler, batch_size=64, num_epochs=2)
    batches, xs, y, mask = collect(stream)
    source = np.concatenate([x[:, 0, 0, 0] for x in xs])  # 1.0 = digit example, 2.0 = item
    for task, value in (("digit", 1.0), ("item", 2.0)):
        np.testing.assert_array_equal(mask[task], (source == value).astype(np.float32))
        assert np.all(y[task][mask[task] == 0] == 0)  # dummy label where masked
        assert np.all(y[task][mask[task] == 1] >= 1)  # real labels (1..9) elsewhere
    np.testing.assert_array_equal(mask["digit"] + mask["item"], 1.0)
    x_spec, y_spec, mask_spec = stream.element_spec
    assert tuple(x_spec.shape)[1:] == (4, 4, 1) and mask_spec["item"].dtype == tf.float32
    assert y_spec["digit"].dtype == tf.int64


def test_default_epoch_length_is_total_size_and_ratios_match_samplers():
    total = sum(SIZES.values())
    counts = {}
    for sampler, kwargs in [
        ("uniform", {}),
        ("proportional", {}),
        ("proportional", {"temperature": 2.0}),
    ]:
        _, _, _, mask = collect(mix(two_tasks(), sampler, batch_size=100, epoch_length=6000, **kwargs))
        counts[(sampler, kwargs.get("temperature"))] = mask["digit"].mean()
        assert mask["digit"].size == 6000
    # 6000 draws: standard error <= 0.0065, tolerance about 4 standard errors.
    assert abs(counts[("uniform", None)] - 0.5) < 0.026
    assert abs(counts[("proportional", None)] - 0.8) < 0.026
    assert abs(counts[("proportional", 2.0)] - 2 / 3) < 0.026  # sqrt(800) : sqrt(200)
    _, _, _, mask = collect(mix(two_tasks(), "uniform", batch_size=128))
    assert mask["digit"].size == total


def test_annealed_schedule_moves_from_proportional_towards_uniform():
    probabilities = annealed_probabilities([800, 200], num_epochs=3, temperature=5.0)
    np.testing.assert_allclose(probabilities[0], [0.8, 0.2])
    np.testing.assert_allclose(probabilities[-1], np.array([800, 200]) ** 0.2 / (800**0.2 + 200**0.2))
    assert probabilities[0, 0] > probabilities[1, 0] > probabilities[2, 0] > 0.5
    stream = mix(two_tasks(), "annealed", batch_size=100, epoch_length=3000, num_epochs=3)
    assert int(stream.cardinality()) == 90
    batches, _, _, _ = collect(stream)
    per_epoch = np.array(
        [np.mean([b[2]["digit"].mean() for b in batches[e * 30 : (e + 1) * 30]]) for e in range(3)]
    )
    np.testing.assert_allclose(per_epoch, probabilities[:, 0], atol=0.035)


def test_round_robin_alternates_whole_batches():
    stream = mix(two_tasks(), "round_robin", batch_size=50, epoch_length=500)
    batches, _, _, _ = collect(stream)
    assert len(batches) == 10 == int(stream.cardinality())
    for step, batch in enumerate(batches):
        task = ["digit", "item"][step % 2]
        np.testing.assert_array_equal(batch[2][task], 1.0)


def test_deterministic_for_a_seed_and_rerandomized_each_pass():
    def choices(stream):
        return np.concatenate([b[2]["digit"].numpy() for b in stream])

    stream = mix(two_tasks(), "uniform", batch_size=100, seed=7)
    first, second = choices(stream), choices(stream)
    np.testing.assert_array_equal(first, choices(mix(two_tasks(), "uniform", batch_size=100, seed=7)))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, choices(mix(two_tasks(), "uniform", batch_size=100, seed=8)))


def test_routed_inputs_are_keyed_by_task_with_zeros_for_other_tasks():
    datasets = {
        "digit": task_dataset("digit", 50, 1.0, shape=(4, 4, 1)),
        "item": task_dataset("item", 50, 2.0, shape=(6, 6, 1), label_dtype="float32"),
    }
    stream = mix(datasets, "uniform", batch_size=20, routed=True)
    for x, y, mask in stream:
        assert x["digit"].shape[1:] == (4, 4, 1) and x["item"].shape[1:] == (6, 6, 1)
        np.testing.assert_array_equal(x["digit"].numpy()[:, 0, 0, 0], mask["digit"].numpy())
        np.testing.assert_array_equal(x["item"].numpy()[:, 0, 0, 0], 2.0 * mask["item"].numpy())
        assert y["item"].dtype == tf.float32 and y["digit"].dtype == tf.int64


def test_masked_loss_is_the_mean_over_the_tasks_own_examples():
    inputs = keras.Input((4, 4, 1))
    flat = keras.layers.Flatten()(inputs)
    outputs = {
        "digit": keras.layers.Dense(10, name="digit")(flat),
        "item": keras.layers.Dense(10, name="item")(flat),
    }
    model = keras.Model(inputs, outputs)
    loss = {
        task: keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        )
        for task in outputs
    }
    model.compile(optimizer="sgd", loss=loss)
    stream = mix(two_tasks(), "proportional", batch_size=200, epoch_length=200)
    x, y, mask = next(iter(stream))
    result = model.evaluate(x, y, sample_weight=mask, batch_size=200, return_dict=True, verbose=0)
    predictions = model.predict(x, verbose=0)
    for task in outputs:
        own = mask[task].numpy() == 1
        expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            y[task].numpy()[own], predictions[task][own]
        )
        np.testing.assert_allclose(result[f"{task}_loss"], float(expected), rtol=1e-5)


def test_real_mnist_and_fashion_streams_mix():
    import kmtl.data

    if not (kmtl.data.available("mnist") and kmtl.data.available("fashion_mnist")):
        pytest.skip("needs the MNIST and Fashion-MNIST files under $KMTL_DATA_DIR")
    from kmtl.data import fashion_tasks, mnist_tasks

    datasets = {
        "digit": mnist_tasks(["digit"], split="test[:300]", batch_size=None, seed=0),
        "item": fashion_tasks(["item"], split="test[:100]", batch_size=None, seed=0),
    }
    stream = mix(datasets, "proportional", batch_size=50, seed=0)
    _, xs, y, mask = collect(stream)
    assert mask["digit"].size == 400 and abs(mask["digit"].mean() - 0.75) < 0.1
    assert xs[0].shape[1:] == (28, 28, 1)
    assert set(np.unique(y["item"][mask["item"] == 1])) <= set(range(10))
    assert np.all(y["digit"][mask["digit"] == 0] == 0)


def batched():
    return task_dataset("digit", 10, 1.0).batch(5)


@pytest.mark.parametrize(
    "datasets, kwargs, error, match",
    [
        ({}, {}, ValueError, r"non-empty dict.*Received: datasets=\{\}"),
        (
            {"digit": task_dataset("item", 10, 1.0)},
            {},
            ValueError,
            r"registered under task 'digit'.*\['item'\]",
        ),
        ({"digit": None}, {}, TypeError, r"task 'digit'.*Received: NoneType"),
        ("batched", {}, ValueError, r"unbatched.*batch_size=None"),
        (
            "two",
            {"sampler": "random"},
            ValueError,
            r"\['uniform', 'proportional', 'annealed', 'round_robin'\].*Received: sampler='random'",
        ),
        ("two", {"sampler": "annealed"}, ValueError, r"Received: num_epochs=None"),
        ("two", {"temperature": 0.0}, ValueError, r"Received: temperature=0.0"),
        ("two", {"batch_size": 0}, ValueError, r"Received: batch_size=0"),
        ("shapes", {}, ValueError, r"different inputs.*routed=True"),
        ("unknown", {}, ValueError, r"sizes=.*Received: cardinality=-2"),
    ],
)
def test_clear_errors(datasets, kwargs, error, match):
    if datasets == "batched":
        datasets = {"digit": batched()}
    elif datasets == "two":
        datasets = two_tasks()
    elif datasets == "shapes":
        datasets = {
            "digit": task_dataset("digit", 5, 1.0),
            "item": task_dataset("item", 5, 2.0, shape=(3, 3, 1)),
        }
    elif datasets == "unknown":
        datasets = {"digit": task_dataset("digit", 5, 1.0).filter(lambda x, y: True)}
    with pytest.raises(error, match=match):
        mix(datasets, **kwargs)


@pytest.mark.parametrize(
    "sizes, match",
    [
        ({"digit": -5}, r"`sizes\['digit'\]` must be a positive integer.*Received: sizes\['digit'\]=-5$"),
        ({"digit": 0}, r"Received: sizes\['digit'\]=0$"),
        ({"digit": float("nan")}, r"Received: sizes\['digit'\]=nan$"),
        ({"digit": np.float64("nan")}, r"Received: sizes\['digit'\]=.*nan\)?$"),
        ({"digit": 2.5}, r"Received: sizes\['digit'\]=2.5$"),
        ({"digit": 800.0}, r"Received: sizes\['digit'\]=800.0$"),
        ({"digit": "800"}, r"Received: sizes\['digit'\]='800'$"),
        ({"digit": True}, r"Received: sizes\['digit'\]=True$"),
        ({"digit": None}, r"Received: sizes\['digit'\]=None$"),
        (
            {"digit": 800, "colour": 5},
            r"only name tasks.*\['digit', 'item'\].*Received: unknown task\(s\) \['colour'\]",
        ),
        ([("digit", 800)], r"must be a dict.*Received: sizes=\[\('digit', 800\)\]$"),
    ],
)
@pytest.mark.parametrize("sampler", ["uniform", "proportional"])
def test_bad_sizes_are_clear_errors(sizes, match, sampler):
    # Checked whether or not the sampler needs the sizes (uniform with a given epoch length does not).
    with pytest.raises(ValueError, match=match):
        mix(two_tasks(), sampler, batch_size=10, epoch_length=100, sizes=sizes)


def test_valid_sizes_replace_the_cardinality():
    stream = mix(two_tasks(), "proportional", batch_size=100, sizes={"digit": np.int64(200), "item": 200})
    assert int(stream.cardinality()) == 4  # epoch length 400 = the sizes given, not 1000
    _, _, _, mask = collect(stream)
    assert mask["digit"].size == 400


@pytest.mark.parametrize("temperature", [True, float("nan"), -1.0, "2"])
def test_bad_temperatures_are_clear_errors(temperature):
    with pytest.raises(ValueError, match=r"Received: temperature="):
        mix(two_tasks(), "proportional", batch_size=10, temperature=temperature)


def test_numpy_float_temperature_is_accepted():
    stream = mix(two_tasks(), "proportional", batch_size=100, temperature=np.float32(2.0))
    assert int(stream.cardinality()) == 10


def test_unknown_cardinality_works_with_sizes_or_epoch_length():
    unknown = {
        "digit": task_dataset("digit", 5, 1.0).filter(lambda x, y: True),
        "item": task_dataset("item", 5, 2.0),
    }
    assert int(mix(unknown, "uniform", batch_size=4, epoch_length=12).cardinality()) == 3
    assert int(mix(unknown, "proportional", batch_size=4, sizes={"digit": 5}).cardinality()) == 3


def test_kmtl_model_fits_the_masked_stream():
    import kmtl
    from kmtl import heads, trunks

    model = kmtl.build_model(
        input_shape=(4, 4, 1),
        trunk=trunks.dense((8,)),
        heads=[heads.Classification("digit", 10), heads.Classification("item", 10)],
    )
    model.compile(optimizer="adam")
    stream = mix(two_tasks(), "proportional", batch_size=50, epoch_length=200)
    history = model.fit(stream, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["digit_loss"])) and np.all(np.isfinite(history["item_loss"]))
    annealed = mix(two_tasks(), "annealed", batch_size=50, epoch_length=200, num_epochs=2)
    model.fit(annealed, epochs=2, steps_per_epoch=4, verbose=0)
