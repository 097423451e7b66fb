"""Tests for kmtl.data.sources: data_dir, load_arrays (local, tfds, digits, auto), splits, cache."""

import gzip
import socket
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kmtl.data import IDXError, clear_cache, data_dir, load_arrays, parse_split, sources, write_idx

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _write_mnist_like(root: Path, split="train", num=6, folder="mnist", gz=True, labels=None):
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(num, 28, 28), dtype=np.uint8)
    labels = np.arange(num, dtype=np.uint8) % 10 if labels is None else np.asarray(labels, np.uint8)
    write_idx(root / folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(root / folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


# --- data_dir ---


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KMTL_DATA_DIR", str(tmp_path / "env"))
    assert data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_dir() == tmp_path / "env"
    monkeypatch.setenv("KMTL_DATA_DIR", "")
    assert data_dir() == Path.home() / ".kmtl" / "data"
    monkeypatch.delenv("KMTL_DATA_DIR")
    assert data_dir() == Path.home() / ".kmtl" / "data"
    assert data_dir("~/somewhere") == Path.home() / "somewhere"


# --- real files ---


def test_mnist_local_train_and_test(mnist_dir):
    images, labels = load_arrays("mnist", "train", source="local", data_dir=mnist_dir)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == MNIST_TRAIN_COUNTS
    assert not images.flags.writeable and not labels.flags.writeable
    images, labels = load_arrays("mnist", "test", source="local", data_dir=mnist_dir)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == MNIST_TEST_COUNTS
    assert images.max() == 255 and images[:, 0, 0].max() == 0  # background is 0, digit centred


def test_fashion_local_counts(mnist_dir):
    for split, count in [("train", 6000), ("test", 1000)]:
        images, labels = load_arrays("fashion_mnist", split, source="local", data_dir=mnist_dir)
        assert images.shape == (10 * count, 28, 28)
        assert np.bincount(labels).tolist() == [count] * 10


def test_auto_uses_local_files_from_env(mnist_dir, monkeypatch):
    monkeypatch.setenv("KMTL_DATA_DIR", str(mnist_dir))
    monkeypatch.setattr(sources, "_tfds_prepared", lambda *args: pytest.fail("tfds consulted"))
    images, _ = load_arrays("mnist", "test[:10]")
    reference, _ = load_arrays("mnist", "test", source="local", data_dir=mnist_dir)
    np.testing.assert_array_equal(images, reference[:10])


def test_arrays_are_cached(mnist_dir):
    first = load_arrays("mnist", "test", source="local", data_dir=mnist_dir)
    second = load_arrays("mnist", "test", source="local", data_dir=mnist_dir)
    assert first[0] is second[0] and first[1] is second[1]


# --- splits ---


@pytest.mark.parametrize(
    "split, expected",
    [
        ("train[:1000]", slice(0, 1000)),
        ("train[10%:]", slice(6000, 60000)),
        ("train[:50%]", slice(0, 30000)),
        ("test[-500:]", slice(9500, 10000)),
        ("test[100:200]", slice(100, 200)),
        ("test[-10%:]", slice(9000, 10000)),
    ],
)
def test_split_slicing(mnist_dir, split, expected):
    base = split.split("[")[0]
    full_images, full_labels = load_arrays("mnist", base, source="local", data_dir=mnist_dir)
    images, labels = load_arrays("mnist", split, source="local", data_dir=mnist_dir)
    np.testing.assert_array_equal(labels, full_labels[expected])
    np.testing.assert_array_equal(images, full_images[expected])


def test_percent_rounds_to_closest(tmp_path):
    _write_mnist_like(tmp_path, num=7)
    _, labels = load_arrays("mnist", "train[:50%]", source="local", data_dir=tmp_path)
    assert len(labels) == 4  # round(3.5) as tfds's "closest" rounding (banker's: 4)


def test_parse_split_forms():
    assert parse_split("train") == ("train", None)
    assert parse_split("test[:10%]") == ("test", slice(None, "10%"))
    assert parse_split("train[ 5 : -5 ]") == ("train", slice(5, -5))


@pytest.mark.parametrize(
    "split", ["validation", "train[1:2:3]", "train[abc:]", "train[5]", "Train", "train+test", 3, None]
)
def test_unknown_split(split):
    with pytest.raises(ValueError, match="expected 'train' or 'test'") as info:
        load_arrays("digits", split)
    assert "Received: split=" in str(info.value)


def test_percent_out_of_range():
    with pytest.raises(ValueError, match="-100..100"):
        load_arrays("digits", "train[:150%]")


# --- errors ---


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="Unknown dataset") as info:
        load_arrays("cifar10")
    message = str(info.value)
    assert (
        "'mnist'" in message and "'emnist/balanced'" in message and "Received: dataset='cifar10'" in message
    )


def test_unknown_source_lists_choices():
    with pytest.raises(ValueError, match=r"\['auto', 'local', 'tfds'\]. Received: source='web'"):
        load_arrays("mnist", source="web")


def test_missing_local_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_arrays("fashion_mnist", "test", source="local", data_dir=tmp_path)
    message = str(info.value)
    for fragment in [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        str(tmp_path / "fashion-mnist"),
        "data_dir argument",
        "KMTL_DATA_DIR",
        "source='tfds'",
    ]:
        assert fragment in message


def test_missing_files_names_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("KMTL_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data directory from \$KMTL_DATA_DIR"):
        load_arrays("mnist", source="local")


def test_auto_without_data_fails_without_network(tmp_path, monkeypatch):
    attempts = []

    def no_connect(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    with pytest.raises(FileNotFoundError) as info:
        load_arrays("mnist", "train", data_dir=tmp_path / "data", tfds_data_dir=tmp_path / "tfds")
    assert attempts == []
    assert "tfds has not prepared it either" in str(info.value)
    assert str(tmp_path / "tfds") in str(info.value)


def test_auto_falls_back_to_prepared_tfds(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_tfds_prepared", lambda dataset, tfds_data_dir: True)
    with tfds.testing.mock_data(num_examples=5):
        images, labels = load_arrays("mnist", "test", data_dir=tmp_path)
    assert images.shape == (5, 28, 28) and labels.shape == (5,)


def test_corrupt_local_file_names_the_file(tmp_path):
    _write_mnist_like(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(IDXError, match="train-images-idx3-ubyte.gz"):
        load_arrays("mnist", "train", source="local", data_dir=tmp_path)


def test_count_mismatch(tmp_path):
    _write_mnist_like(tmp_path, num=6, labels=[1, 2, 3])
    with pytest.raises(IDXError, match="6 images and 3 labels"):
        load_arrays("mnist", source="local", data_dir=tmp_path)


def test_labels_out_of_range(tmp_path):
    _write_mnist_like(tmp_path, num=3, labels=[1, 2, 12])
    with pytest.raises(ValueError, match=r"must lie in 0..9. Received: labels in 1..12"):
        load_arrays("mnist", source="local", data_dir=tmp_path)


def test_images_file_with_wrong_rank(tmp_path):
    (tmp_path / "mnist").mkdir()
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((2, 784), np.uint8))
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(IDXError, match=r"images \[N, H, W\]. Received: dtype=uint8, shape=\(2, 784\)"):
        load_arrays("mnist", source="local", data_dir=tmp_path)


@pytest.mark.parametrize("source", ["local", "auto"])
def test_directory_in_place_of_the_images_file_is_named(tmp_path, source):
    _write_mnist_like(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.unlink()
    path.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        load_arrays("mnist", "train", source=source, data_dir=tmp_path)
    message = str(info.value)
    assert f"{str(path)!r} is a directory, not a file" in message
    assert message.endswith(f"Received: a directory at {str(path)!r}")


def test_directory_beside_an_uncompressed_file_is_ignored(tmp_path):
    images, _ = _write_mnist_like(tmp_path, gz=False)
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").mkdir()
    np.testing.assert_array_equal(load_arrays("mnist", source="local", data_dir=tmp_path)[0], images)


def test_gzip_file_inflating_past_its_header_names_the_file(tmp_path):
    _write_mnist_like(tmp_path, num=2)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    # A header declaring 2 images, followed by 1,000 of them.
    path.write_bytes(
        gzip.compress(
            b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28)) + bytes(1000 * 784)
        )
    )
    with pytest.raises(
        IDXError,
        match=r"train-images-idx3-ubyte.gz' is longer than its header says.*"
        r"Received: more than 1568 payload bytes$",
    ):
        load_arrays("mnist", source="local", data_dir=tmp_path)


# --- local files, uncompressed, cache ---


def test_uncompressed_files_accepted(tmp_path):
    images, labels = _write_mnist_like(tmp_path, split="test", gz=False, folder="fashion-mnist")
    loaded_images, loaded_labels = load_arrays("fashion_mnist", "test", source="local", data_dir=tmp_path)
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)


def test_clear_cache_rereads_files(tmp_path):
    _write_mnist_like(tmp_path, num=4)
    assert len(load_arrays("mnist", source="local", data_dir=tmp_path)[1]) == 4
    _write_mnist_like(tmp_path, num=9)
    assert len(load_arrays("mnist", source="local", data_dir=tmp_path)[1]) == 4  # cached
    clear_cache()
    assert len(load_arrays("mnist", source="local", data_dir=tmp_path)[1]) == 9


# --- tfds ---


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_tfds_source_under_mock_data(dataset):
    with tfds.testing.mock_data(num_examples=6):
        images, labels = load_arrays(dataset, "train", source="tfds")
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (6,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() <= 9
    assert not images.flags.writeable


def test_tfds_mocks_are_not_served_from_cache():
    with tfds.testing.mock_data(num_examples=3):
        assert len(load_arrays("mnist", "test", source="tfds")[1]) == 3
    with tfds.testing.mock_data(num_examples=8):
        assert len(load_arrays("mnist", "test", source="tfds")[1]) == 8


# --- digits ---


def test_digits_split():
    train_images, train_labels = load_arrays("digits", "train")
    test_images, test_labels = load_arrays("digits", "test")
    assert train_images.shape == (1438, 8, 8) and test_images.shape == (359, 8, 8)
    assert train_images.dtype == np.uint8 and train_labels.dtype == np.int64
    assert train_images.max() == 255 and train_images.min() == 0
    counts = np.bincount(test_labels) / (np.bincount(test_labels) + np.bincount(train_labels))
    np.testing.assert_allclose(counts, 0.2, atol=0.01)  # stratified 80/20
    from sklearn.datasets import load_digits

    bunch = load_digits()
    scaled = np.round(bunch.images * 255 / 16).astype(np.uint8).reshape(len(bunch.images), -1)
    together = np.concatenate([train_images, test_images]).reshape(-1, 64)
    assert sorted(map(bytes, together)) == sorted(map(bytes, scaled))  # a partition of all 1797


def test_digits_ignores_source_and_data_dir(tmp_path):
    a = load_arrays("digits", "test", source="local", data_dir=tmp_path)
    b = load_arrays("digits", "test", source="tfds")
    np.testing.assert_array_equal(a[1], b[1])
    assert len(load_arrays("digits", "train[:100]")[1]) == 100
