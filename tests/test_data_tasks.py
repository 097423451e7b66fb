"""Tests for kmtl.data.tasks: derived labels, pipeline structure, shuffling, batching, errors."""

import numpy as np
import pytest
import tensorflow as tf

import kmtl
from kmtl import heads
from kmtl.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_GROUPS,
    available_tasks,
    class_names,
    digits_tasks,
    fashion_tasks,
    input_shape,
    load_arrays,
    mnist_tasks,
    task_dataset,
    task_heads,
)


def _collect(dataset):
    """Concatenates a batched (x, y[, w]) dataset into NumPy arrays."""
    parts = list(dataset.as_numpy_iterator())
    images = np.concatenate([part[0] for part in parts])
    labels = {key: np.concatenate([part[1][key] for part in parts]) for key in parts[0][1]}
    return images, labels


def test_mnist_structure_and_derived_labels(mnist_dir):
    tasks = ["value", "digit", "parity", "large"]
    dataset = mnist_tasks(tasks, split="test[:2000]", batch_size=500, data_dir=mnist_dir, source="local")
    image_spec, label_spec = dataset.element_spec
    assert image_spec.shape.as_list() == [None, 28, 28, 1] and image_spec.dtype == tf.float32
    assert list(label_spec) == tasks  # requested order
    assert {k: v.dtype for k, v in label_spec.items()} == {
        "value": tf.float32,
        "digit": tf.int32,
        "parity": tf.float32,
        "large": tf.float32,
    }
    images, labels = _collect(dataset)
    source_images, source_labels = load_arrays("mnist", "test[:2000]", source="local", data_dir=mnist_dir)
    np.testing.assert_array_equal(labels["digit"], source_labels)  # test split is not shuffled
    np.testing.assert_array_equal(labels["parity"], source_labels % 2)
    np.testing.assert_array_equal(labels["large"], source_labels >= 5)
    np.testing.assert_array_equal(labels["value"], source_labels.astype(np.float32))
    np.testing.assert_allclose(images[..., 0], source_images / 255.0, atol=1e-6)
    assert images.min() == 0.0 and images.max() == 1.0


def test_fashion_item_and_group(mnist_dir):
    dataset = fashion_tasks(["group", "item"], split="test", batch_size=2500, data_dir=mnist_dir)
    _, labels = _collect(dataset)
    _, source_labels = load_arrays("fashion_mnist", "test", data_dir=mnist_dir)
    np.testing.assert_array_equal(labels["item"], source_labels)
    expected_group = {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 2, 5: 3, 7: 3, 9: 3, 8: 4}
    np.testing.assert_array_equal(labels["group"], [expected_group[int(y)] for y in source_labels])
    assert np.bincount(labels["group"]).tolist() == [4000, 1000, 1000, 3000, 1000]
    assert class_names("fashion_mnist", "group") == list(FASHION_MNIST_GROUPS)
    assert class_names("fashion_mnist", "item")[9] == FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_train_shuffle_is_deterministic_per_seed_and_reshuffles(mnist_dir):
    def first_epochs(seed, epochs=2):
        dataset = mnist_tasks(["digit"], split="train[:3000]", batch_size=1000, seed=seed, data_dir=mnist_dir)
        return [_collect(dataset)[1]["digit"] for _ in range(epochs)]

    a, b, c = first_epochs(0), first_epochs(0), first_epochs(1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])  # reshuffled every epoch
    assert not np.array_equal(a[0], c[0])  # another seed, another order
    _, source_labels = load_arrays("mnist", "train[:3000]", data_dir=mnist_dir)
    assert not np.array_equal(a[0], source_labels)  # train shuffles by default
    np.testing.assert_array_equal(np.sort(a[0]), np.sort(source_labels))  # a permutation


def test_shuffle_flag_overrides_default(mnist_dir):
    _, source_labels = load_arrays("mnist", "train[:1000]", data_dir=mnist_dir)
    ordered = mnist_tasks(["digit"], split="train[:1000]", batch_size=256, shuffle=False, data_dir=mnist_dir)
    np.testing.assert_array_equal(_collect(ordered)[1]["digit"], source_labels)
    shuffled = mnist_tasks(["digit"], split="test[:1000]", batch_size=256, shuffle=True, data_dir=mnist_dir)
    assert not np.array_equal(_collect(shuffled)[1]["digit"], load_arrays("mnist", "test[:1000]")[1])


def test_batching_and_cardinality(mnist_dir):
    dataset = mnist_tasks(["digit"], split="test[:1000]", batch_size=300, data_dir=mnist_dir)
    assert int(dataset.cardinality()) == 4
    assert [int(x.shape[0]) for x, _ in dataset] == [300, 300, 300, 100]
    dropped = mnist_tasks(["digit"], split="test[:1000]", batch_size=300, drop_remainder=True)
    assert int(dropped.cardinality()) == 3
    assert dropped.element_spec[0].shape.as_list() == [300, 28, 28, 1]


def test_unbatched_examples(mnist_dir):
    dataset = mnist_tasks(["digit", "parity"], split="test[:1500]", batch_size=None, data_dir=mnist_dir)
    image_spec, label_spec = dataset.element_spec
    assert image_spec.shape.as_list() == [28, 28, 1]
    assert label_spec["digit"].shape.as_list() == []
    assert int(dataset.cardinality()) == 1500
    labels = np.array([int(y["digit"]) for _, y in dataset])
    np.testing.assert_array_equal(labels, load_arrays("mnist", "test[:1500]")[1])


def test_unbatched_shuffle_keeps_images_and_labels_together(mnist_dir):
    images, labels = load_arrays("mnist", "test[:300]", data_dir=mnist_dir)
    dataset = mnist_tasks(["digit"], split="test[:300]", batch_size=None, shuffle=True, seed=3)
    lookup = {images[i].tobytes(): labels[i] for i in range(len(labels))}
    for image, target in dataset.take(50):
        key = np.round(image.numpy()[..., 0] * 255).astype(np.uint8).tobytes()
        assert lookup[key] == int(target["digit"])


def test_digits_tasks_offline_default():
    dataset = digits_tasks(["digit", "parity", "large", "value"], split="train", batch_size=64)
    images, labels = next(iter(dataset))
    assert images.shape == (64, 8, 8, 1)
    np.testing.assert_array_equal(labels["parity"].numpy(), labels["digit"].numpy() % 2)
    assert int(dataset.cardinality()) == int(np.ceil(1438 / 64))
    test = task_dataset("digits", ["digit"], split="test", batch_size=None)
    assert int(test.cardinality()) == 359


def test_available_tasks_input_shape_and_heads():
    assert available_tasks("mnist") == ["digit", "parity", "large", "value"]
    assert available_tasks("digits") == ["digit", "parity", "large", "value"]
    assert available_tasks("fashion_mnist") == ["item", "group"]
    assert input_shape("digits") == (8, 8, 1) and input_shape("mnist") == (28, 28, 1)
    built = task_heads("mnist", ["value", "digit", "large"])
    assert [type(h) for h in built] == [heads.Regression, heads.Classification, heads.Binary]
    assert [h.name for h in built] == ["value", "digit", "large"] and built[1].num_classes == 10
    group = task_heads("fashion_mnist", ["group"])[0]
    assert isinstance(group, heads.Classification) and group.num_classes == 5
    assert class_names("digits", "digit") == [str(d) for d in range(10)]


def test_pipeline_trains_a_model_on_digits():
    tasks = ["digit", "parity", "value"]
    model = kmtl.build_model(
        input_shape=input_shape("digits"),
        trunk=kmtl.trunks.dense((32,)),
        heads=task_heads("digits", tasks),
    )
    model.compile(optimizer="adam")
    history = model.fit(digits_tasks(tasks, batch_size=128), epochs=2, verbose=0)
    assert {"digit_loss", "parity_loss", "value_loss"} <= set(history.history)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize(
    "tasks, fragment",
    [
        (["digit", "colour"], "Unknown task(s) ['colour'] for dataset 'mnist'; available tasks: ['digit'"),
        (["digit", "digit"], "Duplicate task names ['digit']"),
        ([], "non-empty list"),
        (None, "non-empty list"),
        (["item"], "Unknown task(s) ['item']"),
    ],
)
def test_bad_tasks(tasks, fragment):
    with pytest.raises(ValueError) as info:
        task_dataset("mnist", tasks, batch_size=8)
    assert fragment in str(info.value) and "Received: tasks=" in str(info.value)
    with pytest.raises(ValueError):
        task_heads("mnist", tasks)


def test_single_task_string_is_one_task():
    images, labels = next(iter(digits_tasks("digit", batch_size=4)))
    assert list(labels) == ["digit"]


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True, "32"])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="positive integer or None.*Received: batch_size="):
        digits_tasks(["digit"], batch_size=batch_size)


def test_unknown_dataset_and_non_classification_names():
    with pytest.raises(ValueError, match="Unknown dataset"):
        task_dataset("svhn", ["digit"])
    with pytest.raises(ValueError, match="Unknown dataset"):
        input_shape("svhn")
    with pytest.raises(ValueError, match="regression task"):
        class_names("mnist", "value")
