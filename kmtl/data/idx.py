"""Reading and writing IDX files, the format of MNIST, Fashion-MNIST and EMNIST.

An IDX file is a 4-byte magic number (two zero bytes, a type byte, the
number of dimensions), then one big-endian uint32 size per dimension, then
the values in C order. The official files are distributed gzipped.

`read_idx` checks every part of that layout and raises `IDXError` (a
`ValueError`) naming the file and what was wrong, so that a truncated
download or a file of the wrong kind never turns into silently wrong arrays.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDXError", "read_idx", "write_idx"]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type byte -> (numpy dtype as stored, name). Stored values are big-endian.
_TYPES = {
    0x08: (np.dtype("u1"), "unsigned byte"),
    0x09: (np.dtype("i1"), "signed byte"),
    0x0B: (np.dtype(">i2"), "short (int16)"),
    0x0C: (np.dtype(">i4"), "int (int32)"),
    0x0D: (np.dtype(">f4"), "float (float32)"),
    0x0E: (np.dtype(">f8"), "double (float64)"),
}


class IDXError(ValueError):
    """An IDX file is corrupt, truncated or not an IDX file.

    The message names the file and ends with what was received.
    """


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise IDXError(
                f"IDX file {str(path)!r} is a corrupt or truncated gzip stream; "
                f"download it again. Received: {type(error).__name__}: {error}"
            ) from None
    if path.name.endswith(".gz"):
        raise IDXError(
            f"IDX file {str(path)!r} has a .gz name but is not gzip data (a gzip "
            f"stream starts with bytes 1f 8b). Received: first bytes {raw[:4].hex(' ')!r}"
        )
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzipped or raw, into a NumPy array.

    Gzip is detected from the content (files named `*.gz` must be gzip). All
    IDX value types are accepted (unsigned byte is the one used by MNIST,
    Fashion-MNIST and EMNIST); multi-byte values are converted to native
    byte order.

    Args:
        path: path of the file, e.g. `".../train-images-idx3-ubyte.gz"`.

    Returns:
        A read-only array with the dimensions stored in the header, e.g.
        `uint8` of shape `(60000, 28, 28)` for MNIST training images.

    Raises:
        FileNotFoundError: if `path` does not exist.
        IDXError: if the gzip stream is corrupt or truncated, the magic
            number is wrong, the type byte is unknown, the header is cut
            short, or the payload is shorter or longer than the dimensions
            say. The message names the file.

    Example:

    >>> images = kmtl.data.read_idx("mnist/t10k-images-idx3-ubyte.gz")
    >>> images.shape, images.dtype
    ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    data = _read_bytes(path)
    where = f"IDX file {str(path)!r}"
    if len(data) < 4:
        raise IDXError(
            f"{where} is too short to hold the 4-byte IDX magic number. Received: {len(data)} bytes"
        )
    if data[0] != 0 or data[1] != 0:
        raise IDXError(
            f"{where} does not start with the IDX magic (two zero bytes, type, ndim); "
            f"it is not an IDX file. Received: first bytes {data[:4].hex(' ')!r}"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _TYPES:
        known = ", ".join(f"0x{code:02X} ({name})" for code, (_, name) in _TYPES.items())
        raise IDXError(
            f"{where} has an unknown IDX type byte; expected one of {known}. "
            f"Received: type byte 0x{type_code:02X}"
        )
    if ndim == 0:
        raise IDXError(f"{where} declares zero dimensions. Received: ndim=0")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(
            f"{where} is truncated inside its header: {ndim} dimensions need "
            f"{header} header bytes. Received: {len(data)} bytes"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype, _ = _TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        problem = "truncated" if payload < expected else "longer than its header says"
        raise IDXError(
            f"{where} is {problem}: dimensions {dims} of {dtype.itemsize}-byte values need "
            f"{expected} payload bytes. Received: {payload} payload bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("="))
        array.setflags(write=False)
    return array


def write_idx(path: str | os.PathLike, array) -> Path:
    """Writes a `uint8` array as an IDX file (gzipped if the name ends in `.gz`).

    The gzip header carries no time stamp, so equal arrays give equal files.

    Args:
        path: destination file; parent folders must exist.
        array: array-like of dtype `uint8` with 1 to 255 dimensions.

    Returns:
        The path written, as a `pathlib.Path`.

    Raises:
        ValueError: if `array` is not `uint8` or has no dimensions.

    Example:

    >>> kmtl.data.write_idx("labels-idx1-ubyte.gz", np.array([3, 1, 4], np.uint8))
    PosixPath('labels-idx1-ubyte.gz')
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(
            f"write_idx writes unsigned-byte IDX files only; cast the array to uint8 "
            f"first. Received: dtype={array.dtype} for {os.fspath(path)!r}"
        )
    if not 1 <= array.ndim <= 255:
        raise ValueError(
            f"write_idx needs an array with 1 to 255 dimensions. "
            f"Received: shape={array.shape} for {os.fspath(path)!r}"
        )
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    data = header + np.ascontiguousarray(array).tobytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    path.write_bytes(data)
    return path
