"""Tests of kmtl.data.recipes (`multi_mnist`, `multi_mnist_arrays`) on real MNIST / Fashion-MNIST subsets."""

import importlib.util
import inspect

import numpy as np
import pytest

import kmtl.data
from kmtl.data import recipes as mm

needs_data = pytest.mark.skipif(
    not (kmtl.data.available("mnist") and kmtl.data.available("fashion_mnist")),
    reason="needs the MNIST and Fashion-MNIST files under $KMTL_DATA_DIR",
)

SPLIT = "test[:600]"


def load(dataset, split=SPLIT):
    from kmtl.data import load_arrays

    return load_arrays(dataset, split=split)


def build(split=SPLIT, recipe="sener", base="mnist", seed=0, **kwargs):
    """Builds without touching the shared data folder or the memory cache."""
    mm.clear_memory_cache()
    kwargs.setdefault("cache_dir", False)
    return mm.multi_mnist_arrays(split, recipe=recipe, base=base, seed=seed, **kwargs)


def place(image, top, left):
    canvas = np.zeros((36, 36), np.uint8)
    canvas[top : top + 28, left : left + 28] = image
    return canvas


def test_recipes_module_is_not_shadowed_by_the_multi_mnist_function():
    # The module used to be `kmtl/data/multi_mnist.py`, hidden behind the function of that name.
    assert inspect.ismodule(mm) and mm.__name__ == "kmtl.data.recipes"
    assert kmtl.data.recipes is mm and "recipes" in kmtl.data.__all__
    assert inspect.isfunction(kmtl.data.multi_mnist) and kmtl.data.multi_mnist is mm.multi_mnist
    assert kmtl.data.multi_mnist_arrays is mm.multi_mnist_arrays
    assert importlib.util.find_spec("kmtl.data.multi_mnist") is None  # no module of that name left


@needs_data
def test_sener_composites_match_source_images_placed_on_canvas():
    images, labels = load("mnist")
    arrays = build()
    assert arrays.images.shape == (600, 28, 28) and arrays.images.dtype == np.uint8
    np.testing.assert_array_equal(arrays.left_index, np.arange(600))  # one per source image
    grid = [int((k + 0.5) * 36 / 28) for k in range(28)]  # nearest neighbour 36 -> 28
    for i in range(0, 600, 37):
        left = place(images[i], 0, 0)
        right = place(images[arrays.right_index[i]], 6, 6)
        expected = np.maximum(left, right)[np.ix_(grid, grid)]
        np.testing.assert_array_equal(arrays.images[i], expected)
    np.testing.assert_array_equal(arrays.labels["left"], labels)
    np.testing.assert_array_equal(arrays.labels["right"], labels[arrays.right_index])


@needs_data
def test_sener_left_object_is_top_left_and_right_object_bottom_right():
    images, _ = load("mnist")
    arrays = build()
    blank = np.zeros_like(images[:50])
    zero, six = np.zeros((50, 2), int), np.full((50, 2), 6)
    only_left = mm.compose(images[:50], blank, zero, six, resize=True)
    only_right = mm.compose(blank, images[arrays.right_index[:50]], zero, six, resize=True)
    # Canvas rows/columns 28..35 hold only the right object, 0..5 only the left.
    assert not only_left[:, 22:, :].any() and not only_left[:, :, 22:].any()
    assert not only_right[:, :5, :].any() and not only_right[:, :, :5].any()
    np.testing.assert_array_equal(arrays.images[:50, :5, :], only_left[:, :5, :])
    np.testing.assert_array_equal(arrays.images[:50, 22:, 22:], only_right[:, 22:, 22:])
    # Ink centre of mass: the left object up-left of the right object.
    rows = np.arange(28)[None, :, None]
    centre_left = (only_left * rows).sum((1, 2)) / only_left.sum((1, 2))
    centre_right = (only_right * rows).sum((1, 2)) / only_right.sum((1, 2))
    assert np.all(centre_left < centre_right)


@needs_data
@pytest.mark.parametrize("base", ["mnist", "fashion", "fashion+mnist"])
def test_pareto_geometry_labels_and_different_classes(base):
    left_source = load("mnist" if base == "mnist" else "fashion_mnist")
    right_source = load("fashion_mnist" if base == "fashion" else "mnist")
    arrays = build(recipe="pareto", base=base)
    assert arrays.images.shape == (1200, 36, 36)
    np.testing.assert_array_equal(arrays.left_index, np.tile(np.arange(600), 2))
    assert arrays.left_offset.min() >= 0 and arrays.left_offset.max() <= 4
    assert arrays.right_offset.min() >= 4 and arrays.right_offset.max() <= 8
    assert len(np.unique(arrays.left_offset, axis=0)) == 25  # all shifts occur
    np.testing.assert_array_equal(arrays.labels["left"], left_source[1][arrays.left_index])
    np.testing.assert_array_equal(arrays.labels["right"], right_source[1][arrays.right_index])
    assert np.all(arrays.labels["left"] != arrays.labels["right"])
    for i in range(0, 1200, 61):
        expected = np.maximum(
            place(left_source[0][arrays.left_index[i]], *arrays.left_offset[i]),
            place(right_source[0][arrays.right_index[i]], *arrays.right_offset[i]),
        )
        np.testing.assert_array_equal(arrays.images[i], expected)
    # The top-left 4x4 corner can only hold the left object, the bottom-right one the right.
    left_corner = np.stack(
        [place(left_source[0][j], *o) for j, o in zip(arrays.left_index, arrays.left_offset, strict=True)]
    )
    np.testing.assert_array_equal(arrays.images[:, :4, :4], left_corner[:, :4, :4])
    assert not left_corner[:, 32:, :].any() and not left_corner[:, :, 32:].any()


@needs_data
def test_fashion_plus_mnist_sener_takes_left_from_fashion_and_right_from_mnist():
    fashion, mnist = load("fashion_mnist"), load("mnist")
    arrays = build(base="fashion+mnist")
    np.testing.assert_array_equal(arrays.labels["left"], fashion[1])
    np.testing.assert_array_equal(arrays.labels["right"], mnist[1][arrays.right_index])
    grid = [int((k + 0.5) * 36 / 28) for k in range(5)]
    np.testing.assert_array_equal(arrays.images[:, :5, :5], fashion[0][:, grid][:, :, grid])


@needs_data
def test_deterministic_for_a_seed_and_different_across_seeds():
    first, again, other = build(seed=3), build(seed=3), build(seed=4)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.right_index, again.right_index)
    assert (first.right_index != other.right_index).mean() > 0.9
    assert not np.array_equal(first.images, other.images)
    pareto, pareto_again = build(recipe="pareto", seed=3), build(recipe="pareto", seed=3)
    np.testing.assert_array_equal(pareto.images, pareto_again.images)


@needs_data
@pytest.mark.parametrize("recipe", ["sener", "pareto"])
def test_class_balance_is_roughly_uniform(recipe):
    arrays = build("train[:6000]", recipe=recipe)
    for task in ("left", "right"):
        frequency = np.bincount(arrays.labels[task], minlength=10) / arrays.labels[task].size
        assert frequency.min() > 0.08 and frequency.max() < 0.125, (task, frequency)


@needs_data
def test_dataset_pipeline_normalises_and_shuffles_deterministically():
    arrays = build()
    ordered = list(mm.multi_mnist(SPLIT, batch_size=256, shuffle=False, cache_dir=False))
    assert len(ordered) == 3
    image, labels = ordered[0]
    assert tuple(image.shape) == (256, 28, 28, 1) and image.dtype.name == "float32"
    pixels = np.concatenate([x.numpy() for x, _ in ordered])[..., 0]
    np.testing.assert_array_equal(np.rint((pixels * 0.3081 + 0.1307) * 255), arrays.images)
    left = np.concatenate([y["left"].numpy() for _, y in ordered])
    np.testing.assert_array_equal(left, arrays.labels["left"])

    def order(dataset):
        return np.concatenate([y["right"].numpy() * 1000 + y["left"].numpy() for _, y in dataset])

    shuffled = mm.multi_mnist(SPLIT, batch_size=100, shuffle=True, seed=0, cache_dir=False)
    epoch_1, epoch_2 = order(shuffled), order(shuffled)
    fresh = order(mm.multi_mnist(SPLIT, batch_size=100, shuffle=True, seed=0, cache_dir=False))
    np.testing.assert_array_equal(np.sort(epoch_1), np.sort(order(ordered)))  # a permutation
    assert not np.array_equal(epoch_1, epoch_2)  # reshuffled every epoch
    np.testing.assert_array_equal(epoch_1, fresh)  # ... deterministically from the seed

    pareto = mm.multi_mnist(SPLIT, recipe="pareto", batch_size=None, shuffle=False, cache_dir=False)
    image, labels = next(iter(pareto))
    assert tuple(image.shape) == (36, 36, 1) and 0.0 <= float(image.numpy().min())
    assert float(image.numpy().max()) <= 1.0 and sorted(labels) == ["left", "right"]


@needs_data
def test_cache_round_trip_and_corrupt_cache_recovery(tmp_path, monkeypatch):
    built = build(cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.npz")
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers

    def fail(*args, **kwargs):
        raise AssertionError("the cache file should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(mm, "_build", fail)
        loaded = build(cache_dir=tmp_path)
    np.testing.assert_array_equal(loaded.images, built.images)
    np.testing.assert_array_equal(loaded.labels["right"], built.labels["right"])

    # Truncated file, then garbage bytes: both detected, rebuilt and rewritten.
    for damage in (cache_file.read_bytes()[:5000], b"not a zip file" * 100):
        cache_file.write_bytes(damage)
        with pytest.warns(UserWarning, match="unreadable MultiMNIST cache"):
            rebuilt = build(cache_dir=tmp_path)
        np.testing.assert_array_equal(rebuilt.images, built.images)
        np.testing.assert_array_equal(build(cache_dir=tmp_path).images, built.images)

    # A valid file under the wrong name (other seed) is not trusted either.
    other = tmp_path / cache_file.name.replace("seed0", "seed5")
    other.write_bytes(cache_file.read_bytes())
    with pytest.warns(UserWarning, match="does not match"):
        assert not np.array_equal(build(seed=5, cache_dir=tmp_path).right_index, built.right_index)

    # Flipped bytes inside the image array fail the zip CRC check.
    data = bytearray(cache_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="unreadable MultiMNIST cache"):
        np.testing.assert_array_equal(build(cache_dir=tmp_path).images, built.images)


@needs_data
def test_default_cache_lives_in_kmtl_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KMTL_CACHE_DIR", str(tmp_path / "cache"))
    mm.clear_memory_cache()
    arrays = mm.multi_mnist_arrays(SPLIT)
    (cache_file,) = (tmp_path / "cache").glob("multi_mnist-sener-mnist-test_600-seed0-*.npz")
    with np.load(cache_file) as data:
        np.testing.assert_array_equal(data["images"], arrays.images)


@needs_data
def test_unwritable_cache_dir_is_skipped(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    arrays = build(cache_dir=blocker / "cache")
    assert arrays.images.shape == (600, 28, 28)


@needs_data
def test_memory_cache_returns_the_same_arrays():
    mm.clear_memory_cache()
    first = mm.multi_mnist_arrays(SPLIT, cache_dir=False)
    assert mm.multi_mnist_arrays(SPLIT, cache_dir=False) is first


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"recipe": "capsnet"}, r"recipe.*\['sener', 'pareto'\].*Received: recipe='capsnet'"),
        ({"base": "emnist"}, r"base.*'fashion\+mnist'.*Received: base='emnist'"),
        ({"split": "validation"}, r"'train' or 'test'.*Received: split='validation'"),
        ({"seed": -1}, r"Received: seed=-1"),
    ],
)
def test_clear_errors_for_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mm.multi_mnist_arrays(**{"split": SPLIT, **kwargs})


def test_bad_batch_size_is_a_clear_error():
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        mm.multi_mnist(SPLIT, batch_size=0, cache_dir=False)


def test_missing_files_name_what_was_looked_for(tmp_path):
    mm.clear_memory_cache()
    with pytest.raises(FileNotFoundError) as error:
        mm.multi_mnist_arrays(SPLIT, source="local", data_dir=str(tmp_path), cache_dir=False)
    assert str(tmp_path) in str(error.value) and "mnist" in str(error.value)


@needs_data
def test_multilenet_with_equal_weights_exceeds_85_percent_on_both_tasks_in_two_short_epochs():
    """The issue's check: MultiLeNet, equal weights, a few epochs on `sener` MultiMNIST.

    A third of the training set, two epochs (half the set for three epochs
    gave left 0.935, right 0.911 on the full test set in about a minute; this
    budget costs a third of that). The threshold is 0.85 on both tasks.
    """
    import keras

    import kmtl
    from kmtl import heads

    keras.utils.set_random_seed(0)
    train = mm.multi_mnist("train[:20000]", recipe="sener", batch_size=128, cache_dir=False)
    test = mm.multi_mnist("test", recipe="sener", batch_size=1000, cache_dir=False)
    model = kmtl.build_model(
        input_shape=(28, 28, 1),
        trunk=kmtl.trunks.lenet(),
        heads=[heads.Classification(task, 10, hidden_units=(50,)) for task in ("left", "right")],
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss_weights={"left": 1.0, "right": 1.0})
    model.fit(train, epochs=2, verbose=0)
    result = model.evaluate(test, return_dict=True, verbose=0)
    assert result["left_accuracy"] > 0.85 and result["right_accuracy"] > 0.85, result


@needs_data
def test_composite_datasets_of_task_dataset_keep_their_composites_and_vary_only_the_order():
    arrays = mm.multi_mnist_arrays("test[:300]", recipe="sener", base="fashion+mnist", seed=0)
    ordered = kmtl.data.task_dataset(
        "multi_fashion_mnist", ["right", "left"], split="test[:300]", batch_size=None
    )
    first = next(iter(ordered))[1]
    assert list(first) == ["right", "left"]  # the requested order
    pairs = [(int(y["left"]), int(y["right"])) for _, y in ordered]
    assert pairs == list(zip(arrays.labels["left"].tolist(), arrays.labels["right"].tolist()))

    def order(seed):
        train = kmtl.data.task_dataset(
            "multimnist", ["left", "right"], split="train[:300]", batch_size=64, seed=seed
        )
        return np.concatenate([x.numpy().reshape(len(x), -1).sum(axis=1) for x, _ in train])

    one, other = order(1), order(2)
    np.testing.assert_allclose(np.sort(one), np.sort(other), rtol=1e-6)  # the same composites...
    assert not np.allclose(one, other)  # ... in another order
    np.testing.assert_array_equal(one, order(1))
    assert kmtl.data.input_shape("multifashion") == (28, 28, 1)
    assert kmtl.data.class_names("multi_fashion_mnist", "left")[0] == "T-shirt/top"
    assert kmtl.data.class_names("multi_fashion_mnist", "right")[0] == "0"
    heads = kmtl.data.task_heads("multimnist", ["left", "right"])
    assert [(h.name, h.hidden_units, h.dropout) for h in heads] == [
        ("left", (50,), 0.5),
        ("right", (50,), 0.5),
    ]
    with pytest.raises(ValueError, match=r"\['left', 'right'\]"):
        kmtl.data.task_dataset("multimnist", ["digit"], split="test[:10]")
