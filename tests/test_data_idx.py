"""Tests for kmtl.data.idx: IDX reading/writing, every malformed-file error, bounded memory."""

import gzip
import json
import os
import subprocess
import sys
import threading
import tracemalloc
import zlib

import numpy as np
import pytest

import kmtl.data.idx as idx_module
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


def test_gzip_payload_longer_than_header(tmp_path, images):
    raw = write_idx(tmp_path / "raw", images).read_bytes()
    path = tmp_path / "longer.gz"
    path.write_bytes(gzip.compress(raw + b"\x00\x00"))
    _expect_error(path, "longer than its header says", "(5, 4, 3)", "Received: more than 60 payload bytes")


@pytest.mark.parametrize("trailer", [b"junk", b"\x00" * 8])
def test_trailing_bytes_after_the_gzip_stream(tmp_path, images, trailer):
    data = write_idx(tmp_path / "full.gz", images).read_bytes()
    path = tmp_path / "trailing.gz"
    path.write_bytes(data + trailer)
    _expect_error(path, "trailing bytes after the end of its gzip stream", trailer[:4].hex(" "))


def test_second_gzip_member(tmp_path, images):
    data = write_idx(tmp_path / "full.gz", images).read_bytes()
    path = tmp_path / "two-members.gz"
    path.write_bytes(data + gzip.compress(b"more"))
    _expect_error(path, "second gzip member", "1f 8b")


def test_payload_split_across_two_gzip_members(tmp_path, images):
    raw = write_idx(tmp_path / "raw", images).read_bytes()
    path = tmp_path / "split.gz"
    path.write_bytes(gzip.compress(raw[:30]) + gzip.compress(raw[30:]))
    _expect_error(path, "second gzip member")


def _header(dims, type_code=0x08):
    return bytes([0, 0, type_code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize("gz", [False, True])
def test_dimension_product_overflow(tmp_path, gz):
    dims = (2**32 - 1,) * 4
    data = _header(dims, 0x0C) + bytes(16)
    path = tmp_path / ("overflow.gz" if gz else "overflow")
    path.write_bytes(gzip.compress(data) if gz else data)
    message = _expect_error(path, "corrupt header", "product of its dimensions overflows", f"dims={dims}")
    assert "-" not in message.split("need ")[1].split(" ")[0]  # the old int64 product went negative


def _traced_peak(function):
    """Runs `function` (expected to raise IDXError); returns the peak traced allocation in bytes."""
    tracemalloc.start()
    try:
        with pytest.raises(IDXError) as info:
            function()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


def test_raw_file_shorter_than_declared_is_refused_before_allocating(tmp_path):
    path = tmp_path / "claims-1GiB"
    path.write_bytes(_header((1024, 1024, 1024)) + bytes(10))
    peak, message = _traced_peak(lambda: read_idx(path))
    assert "is truncated" in message and message.endswith("Received: 10 payload bytes")
    assert peak < 2 << 20  # NumPy reports its array buffers to tracemalloc


def test_gzip_declaring_more_than_deflate_can_produce_is_refused_before_allocating(tmp_path):
    path = tmp_path / "claims-1GiB.gz"
    path.write_bytes(gzip.compress(_header((1024, 1024, 1024)) + bytes(1000)))
    size = path.stat().st_size
    peak, message = _traced_peak(lambda: read_idx(path))
    assert f"a gzip file of {size} bytes inflates to at most about" in message
    assert message.endswith(f"Received: {size} gzip bytes")
    assert peak < 2 << 20  # the 1 MiB read buffer


def test_directory_is_named_as_such(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a file.*Received: a directory at"):
        read_idx(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("gz", [False, True])
def test_reads_from_a_pipe_whose_size_is_unknown(tmp_path, images, gz):
    data = write_idx(tmp_path / ("x.gz" if gz else "x"), images).read_bytes()
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)

    def feed():
        with open(pipe, "wb") as handle:
            handle.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    np.testing.assert_array_equal(read_idx(pipe), images)
    writer.join(timeout=10)


def _write_bomb(path, dims, zeros=1 << 30):
    """Writes a valid gzip file of an IDX header for `dims` followed by `zeros` zero bytes.

    Streamed in constant memory and fast: 8 MiB of zeros are deflated once
    after a full flush (which resets the compressor), and those bytes are
    repeated, since every later 8 MiB block deflates to the same bytes.
    1 GiB of zeros gives a file of about 1 MB.
    """
    header = _header(dims)
    unit = bytes(8 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    crc = zlib.crc32(header)
    with open(path, "wb") as handle:
        handle.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header: deflate, mtime 0
        handle.write(deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH))
        piece = deflate.compress(unit) + deflate.flush(zlib.Z_FULL_FLUSH)
        for _ in range(zeros // len(unit)):
            handle.write(piece)
            crc = zlib.crc32(unit, crc)
        handle.write(deflate.flush())
        total = len(header) + zeros // len(unit) * len(unit)
        handle.write(crc.to_bytes(4, "little") + (total % 2**32).to_bytes(4, "little"))
    return path


# Loads kmtl/data/idx.py by path (no TensorFlow), caps the address space at the
# current size + headroom, resets the RSS high-water mark and reads the file.
_BOMB_CHILD = r"""
import importlib.util, json, resource, sys
module_path, path, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = importlib.util.spec_from_file_location("kmtl_idx_alone", module_path)
idx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(idx)

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))

limit = status("VmSize") + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
before = status("VmRSS")
try:
    idx.read_idx(path)
    outcome = "no error"
except MemoryError:
    outcome = "MemoryError"
except Exception as error:
    outcome = f"{type(error).__name__}: {error}"
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"outcome": outcome, "before": before, "peak": peak,
                  "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("declared", [16, 32 << 20])
def test_gzip_bomb_is_rejected_with_memory_bounded_by_the_declared_size(tmp_path, declared):
    bomb = _write_bomb(tmp_path / "bomb-idx1-ubyte.gz", (declared,))
    assert bomb.stat().st_size < 1.1e6  # 1 GiB of zeros after the header
    headroom = declared + (256 << 20)  # the old reader inflated all of it: 2 GiB RSS
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _BOMB_CHILD, idx_module.__file__, str(bomb), str(headroom)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout)
    assert not report["tensorflow"]
    assert report["outcome"].startswith("IDXError: ")
    assert "longer than its header says" in report["outcome"]
    assert f"Received: more than {declared} payload bytes" in report["outcome"]
    growth = report["peak"] - report["before"]
    assert growth < declared + (8 << 20), f"peak grew by {growth / 2**20:.1f} MiB"


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
