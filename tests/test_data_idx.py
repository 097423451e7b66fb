"""Tests for kmtl.data.idx: IDX reading/writing and every malformed-file error."""

import gzip

import numpy as np
import pytest

from kmtl.data import IDXError, read_idx, write_idx


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_round_trip(tmp_path, images, name):
    path = write_idx(tmp_path / name, images)
    result = read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, images)
    assert not result.flags.writeable
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_round_trip_labels_and_header_bytes(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    path = write_idx(tmp_path / "labels", labels)
    assert path.read_bytes() == b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + labels.tobytes()
    np.testing.assert_array_equal(read_idx(path), labels)


def test_gzip_output_is_deterministic(tmp_path, images):
    first = write_idx(tmp_path / "a.gz", images).read_bytes()
    second = write_idx(tmp_path / "b.gz", images).read_bytes()
    assert first == second


def test_reads_big_endian_types(tmp_path):
    values = np.array([[1, -2], [300, 70000]], dtype=">i4")
    path = tmp_path / "ints-idx2-int"
    path.write_bytes(b"\x00\x00\x0c\x02" + (2).to_bytes(4, "big") * 2 + values.tobytes())
    result = read_idx(path)
    assert result.dtype == np.int32 and result.dtype.isnative
    np.testing.assert_array_equal(result, [[1, -2], [300, 70000]])
    assert not result.flags.writeable


def test_gzip_detected_from_content_without_gz_suffix(tmp_path, images):
    raw = write_idx(tmp_path / "x", images).read_bytes()
    path = tmp_path / "compressed-but-no-suffix"
    path.write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(path), images)


def test_idx_error_is_value_error():
    assert issubclass(IDXError, ValueError)


def _expect_error(path, *fragments):
    with pytest.raises(IDXError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "Received:" in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_truncated_gzip_stream(tmp_path, images):
    data = write_idx(tmp_path / "full.gz", images).read_bytes()
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "corrupt or truncated gzip")


def test_corrupt_gzip_stream(tmp_path, images):
    data = bytearray(write_idx(tmp_path / "full.gz", images).read_bytes())
    data[-6] ^= 0xFF  # breaks the CRC/length trailer
    path = tmp_path / "corrupt.gz"
    path.write_bytes(bytes(data))
    _expect_error(path, "corrupt or truncated gzip")


def test_gz_name_with_plain_content(tmp_path, images):
    raw = write_idx(tmp_path / "raw", images).read_bytes()
    path = tmp_path / "plain.gz"
    path.write_bytes(raw)
    _expect_error(path, "not gzip data")


def test_wrong_magic(tmp_path):
    path = tmp_path / "wrong-magic"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    _expect_error(path, "not an IDX file", "89 50 4e 47")


def test_unknown_type_byte(tmp_path):
    path = tmp_path / "bad-type"
    path.write_bytes(b"\x00\x00\x07\x01" + (2).to_bytes(4, "big") + b"\x01\x02")
    _expect_error(path, "unknown IDX type byte", "0x07", "0x08 (unsigned byte)")


def test_zero_dimensions(tmp_path):
    path = tmp_path / "zero-dims"
    path.write_bytes(b"\x00\x00\x08\x00")
    _expect_error(path, "ndim=0")


@pytest.mark.parametrize("length", [0, 3])
def test_shorter_than_magic(tmp_path, length):
    path = tmp_path / "tiny"
    path.write_bytes(b"\x00" * length)
    _expect_error(path, f"{length} bytes")


def test_truncated_header(tmp_path):
    path = tmp_path / "short-header"
    path.write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big"))
    _expect_error(path, "header", "16 header bytes")


def test_truncated_payload(tmp_path, images):
    raw = write_idx(tmp_path / "raw", images).read_bytes()
    path = tmp_path / "truncated.gz"
    path.write_bytes(gzip.compress(raw[:-7]))
    _expect_error(path, "truncated", "(5, 4, 3)", "60 payload bytes", f"{60 - 7} payload bytes")


def test_trailing_bytes(tmp_path, images):
    raw = write_idx(tmp_path / "raw", images).read_bytes()
    path = tmp_path / "trailing"
    path.write_bytes(raw + b"\x00\x00")
    _expect_error(path, "longer than its header says", "62 payload bytes")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing-here.gz")


@pytest.mark.parametrize(
    "array, fragment",
    [(np.zeros((2, 2), np.float32), "dtype=float32"), (np.uint8(3), "shape=()")],
)
def test_write_rejects_bad_arrays(tmp_path, array, fragment):
    with pytest.raises(ValueError, match="Received:") as info:
        write_idx(tmp_path / "x.gz", array)
    assert fragment in str(info.value)


def test_reads_official_mnist_labels(mnist_dir):
    labels = read_idx(mnist_dir / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
