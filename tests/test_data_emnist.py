"""Tests for EMNIST: orientation, label mapping and derived tasks, from generated IDX files and tfds mocks."""

import string

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kmtl.data import (
    available_tasks,
    class_names,
    emnist_tasks,
    load_arrays,
    task_heads,
    write_idx,
)
from kmtl.data.emnist import EMNIST_SPLITS, emnist_char_names, emnist_derived_labels


def _upright_images(num):
    """Asymmetric images: a bar along the top row and a dot at (row 20, column 3), plus an id pixel."""
    images = np.zeros((num, 28, 28), np.uint8)
    images[:, 0, :20] = 255
    images[:, 20, 3] = 200
    images[:, 27, 27] = np.arange(num) % 256
    return images


def _write_emnist(root, split_name, labels, split="train"):
    """Writes EMNIST-style files, storing the images transposed as the official files do."""
    folder = root / "emnist"
    folder.mkdir(parents=True, exist_ok=True)
    upright = _upright_images(len(labels))
    write_idx(folder / f"emnist-{split_name}-{split}-images-idx3-ubyte.gz", upright.transpose(0, 2, 1))
    write_idx(folder / f"emnist-{split_name}-{split}-labels-idx1-ubyte.gz", np.asarray(labels, np.uint8))
    return upright


def _mock_examples(images, labels):
    """A tfds `mock_data` replacement for `_as_dataset` yielding the given examples."""

    def as_dataset(self, *args, **kwargs):
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[..., None].astype(np.uint8), "label": np.asarray(labels, np.int64)}
        )

    return as_dataset


def _collect(dataset):
    parts = list(dataset.as_numpy_iterator())
    return tuple(
        {key: np.concatenate([part[i][key] for part in parts]) for key in parts[0][i]}
        if isinstance(parts[0][i], dict)
        else np.concatenate([part[i] for part in parts])
        for i in range(len(parts[0]))
    )


def test_char_names_and_split_table():
    assert {name: len(emnist_char_names(name)) for name in EMNIST_SPLITS} == {
        name: classes for name, (classes, _) in EMNIST_SPLITS.items()
    }
    balanced = emnist_char_names("balanced")
    assert balanced[:10] == list(string.digits) and balanced[10:36] == list(string.ascii_uppercase)
    assert "".join(balanced[36:]) == "abdefghnqrt"
    assert emnist_char_names("byclass")[36:] == list(string.ascii_lowercase)
    assert emnist_char_names("letters")[0] == "A"
    assert class_names("emnist/bymerge", "char") == balanced
    with pytest.raises(ValueError, match="Unknown EMNIST split.*Received: split_name='kanji'"):
        emnist_char_names("kanji")


def test_local_files_are_made_upright(tmp_path):
    labels = np.arange(47) % 47
    upright = _write_emnist(tmp_path, "balanced", labels)
    images, loaded = load_arrays("emnist/balanced", "train", source="local", data_dir=tmp_path)
    np.testing.assert_array_equal(images, upright)
    assert images[0, 0, :20].min() == 255 and images[0, 20, 3] == 200  # bar on top, dot lower left
    assert images.flags.c_contiguous and not images.flags.writeable
    np.testing.assert_array_equal(loaded, labels)
    assert loaded.dtype == np.int64


def test_tfds_images_are_made_upright():
    upright = _upright_images(5)
    with tfds.testing.mock_data(
        as_dataset_fn=_mock_examples(upright.transpose(0, 2, 1), [0, 10, 36, 40, 46])
    ):
        images, labels = load_arrays("emnist/balanced", "test", source="tfds")
    np.testing.assert_array_equal(images, upright)
    np.testing.assert_array_equal(labels, [0, 10, 36, 40, 46])


def test_balanced_derived_labels():
    derived = emnist_derived_labels("balanced", np.arange(47))
    np.testing.assert_array_equal(derived["char"], np.arange(47))
    np.testing.assert_array_equal(derived["is_letter"], [0] * 10 + [1] * 37)
    names = emnist_char_names("balanced")
    defined = {names[i] for i in np.flatnonzero(derived["case_weight"])}
    assert defined == set("ABDEFGHNQRT") | set("abdefghnqrt")  # 22 single-case classes
    assert {names[i] for i in np.flatnonzero(derived["case"])} == set("abdefghnqrt")
    assert derived["case"][derived["case_weight"] == 0].max() == 0  # placeholder where masked


def test_byclass_and_other_splits_case():
    byclass = emnist_derived_labels("byclass", np.arange(62))
    np.testing.assert_array_equal(byclass["case_weight"], [0] * 10 + [1] * 52)
    np.testing.assert_array_equal(byclass["case"], [0] * 36 + [1] * 26)
    letters = emnist_derived_labels("letters", np.arange(1, 27))
    np.testing.assert_array_equal(letters["char"], np.arange(26))
    assert letters["case_weight"].max() == 0


@pytest.mark.parametrize(
    "split_name, bad", [("letters", 0), ("letters", 27), ("balanced", 47), ("digits", 10)]
)
def test_labels_out_of_range(tmp_path, split_name, bad):
    _write_emnist(tmp_path, split_name, [1, bad])
    with pytest.raises(ValueError, match=f"emnist/{split_name}.*Received: labels in"):
        load_arrays(f"emnist/{split_name}", source="local", data_dir=tmp_path)


def test_emnist_tasks_with_case_yield_weights(tmp_path):
    labels = np.array([3, 10, 12, 36, 46, 20, 14])  # 3, A, C, a, t, K, E
    _write_emnist(tmp_path, "balanced", labels, split="test")
    dataset = emnist_tasks(["case", "char", "is_letter"], split="test", batch_size=4, data_dir=tmp_path)
    image_spec, label_spec, weight_spec = dataset.element_spec
    assert image_spec.shape.as_list() == [None, 28, 28, 1]
    assert list(label_spec) == ["case", "char", "is_letter"] and list(weight_spec) == list(label_spec)
    images, targets, weights = _collect(dataset)
    np.testing.assert_array_equal(targets["char"], labels)
    np.testing.assert_array_equal(targets["is_letter"], [0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(targets["case"], [0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(weights["case"], [0, 1, 0, 1, 1, 0, 1])  # digit, merged C and K masked
    np.testing.assert_array_equal(weights["char"], np.ones(7))
    np.testing.assert_array_equal(weights["is_letter"], np.ones(7))
    assert images[0, 0, :20, 0].min() == 1.0  # upright after the pipeline too


def test_emnist_tasks_without_case_yield_pairs(tmp_path):
    _write_emnist(tmp_path, "letters", [1, 26, 5])
    dataset = emnist_tasks(["char"], split_name="letters", batch_size=None, shuffle=False, data_dir=tmp_path)
    assert len(dataset.element_spec) == 2
    np.testing.assert_array_equal([int(y["char"]) for _, y in dataset], [0, 25, 4])


def test_emnist_digit_splits_offer_digit_tasks(tmp_path):
    _write_emnist(tmp_path, "digits", [7, 2, 9])
    assert available_tasks("emnist/digits") == ["char", "parity", "large", "value"]
    dataset = emnist_tasks(["char", "parity", "large"], split_name="digits", shuffle=False, data_dir=tmp_path)
    _, targets = _collect(dataset)
    np.testing.assert_array_equal(targets["parity"], [1, 0, 1])
    np.testing.assert_array_equal(targets["large"], [1, 0, 1])


def test_available_tasks_and_heads():
    assert available_tasks("emnist/balanced") == ["char", "is_letter", "case"]
    assert available_tasks("emnist/letters") == ["char"]
    assert [h.num_classes for h in task_heads("emnist/byclass", ["char"])] == [62]
    assert [h.num_classes for h in task_heads("emnist/letters", ["char"])] == [26]
    with pytest.raises(ValueError, match=r"available tasks: \['char'\]"):
        emnist_tasks(["case"], split_name="letters")
    with pytest.raises(ValueError, match="Unknown EMNIST split"):
        emnist_tasks(["char"], split_name="hiragana")


def test_emnist_tasks_under_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        dataset = emnist_tasks(["char", "is_letter", "case"], split="train", batch_size=5, source="tfds")
        images, targets, weights = _collect(dataset)
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.float32
    assert targets["char"].dtype == np.int32 and targets["char"].max() < 47
    derived = emnist_derived_labels("balanced", np.sort(targets["char"]))
    np.testing.assert_array_equal(np.sort(weights["case"]), np.sort(derived["case_weight"]))


def test_letters_under_mock_data_with_official_labels():
    upright = _upright_images(4)
    with tfds.testing.mock_data(as_dataset_fn=_mock_examples(upright.transpose(0, 2, 1), [1, 2, 25, 26])):
        dataset = emnist_tasks(["char"], split_name="letters", batch_size=None, shuffle=False, source="tfds")
        chars = [int(y["char"]) for _, y in dataset]
    assert chars == [0, 1, 24, 25]


def test_default_mock_letters_labels_are_rejected():
    # tfds declares 37 classes for letters, so mock_data draws labels 0..36; real labels are 1..26.
    with tfds.testing.mock_data(num_examples=64):
        with pytest.raises(ValueError, match=r"'emnist/letters' labels from tfds .* must lie in 1..26"):
            load_arrays("emnist/letters", "train", source="tfds")


def test_missing_emnist_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_arrays("emnist/byclass", "test", source="local", data_dir=tmp_path)
    message = str(info.value)
    assert "emnist-byclass-test-images-idx3-ubyte.gz" in message
    assert "emnist-byclass-test-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "emnist") in message
