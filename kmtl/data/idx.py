"""Reading and writing IDX files, the format of MNIST, Fashion-MNIST and EMNIST.

An IDX file is a 4-byte magic number (two zero bytes, a type byte, the
number of dimensions), then one big-endian uint32 size per dimension, then
the values in C order. The official files are distributed gzipped.

`read_idx` checks every part of that layout and raises `IDXError` (a
`ValueError`) naming the file and what was wrong, so that a truncated
download or a file of the wrong kind never turns into silently wrong arrays.

Memory is bounded by the size the header declares and by the data the
file really holds: the header is read first, a declared size the file
cannot possibly hold is refused before anything is allocated (a raw file
must be exactly header + payload long; a gzip file cannot inflate to more
than about 1032 times its size, deflate's maximum ratio), the payload of a
raw file is allocated once at its (verified) size, that of a gzip file or a
pipe in a buffer that grows by a quarter as the data arrives (so a header
claiming far more than the stream holds costs no more than what it holds),
the data is read in chunks of at most 1 MiB, and decompression stops as
soon as the data goes past the declared size. A small gzip file that
inflates to gigabytes (a "gzip bomb") is therefore rejected after a few MiB
of work.

This module needs only NumPy and the standard library (not TensorFlow), so
it can also be loaded on its own by file path.
"""

from __future__ import annotations

import gzip
import os
import stat
import sys
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDXError", "read_idx", "write_idx"]

_GZIP_MAGIC = b"\x1f\x8b"
# Bytes read from the file, and bytes inflated, per step.
_CHUNK = 1 << 20
# Deflate codes a 258-byte match in at least 2 bits (a 1-bit length code and
# a 1-bit distance code), so no deflate stream inflates more than 1032-fold.
_MAX_DEFLATE_RATIO = 1032
# Gzip header and trailer (at least 18 bytes) and block headers, with margin.
_GZIP_SLACK = 1024

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


class _RawStream:
    """The bytes of an uncompressed file, read on demand."""

    def __init__(self, handle, prefix: bytes):
        self._handle = handle
        self._prefix = prefix  # bytes already read to sniff the gzip magic

    def read(self, size: int) -> bytes:
        """Returns `size` bytes, fewer only at the end of the file."""
        head, self._prefix = self._prefix[:size], self._prefix[size:]
        if len(head) == size:
            return head
        return head + self._handle.read(size - len(head))

    def readinto(self, view: memoryview) -> int:
        """Fills `view` as far as the file goes; returns the bytes written."""
        filled = 0
        while filled < len(view):
            if self._prefix:
                part = self.read(min(len(view) - filled, len(self._prefix)))
                view[filled : filled + len(part)] = part
                filled += len(part)
                continue
            count = self._handle.readinto(view[filled : filled + _CHUNK])
            if not count:
                break
            filled += count
        return filled

    def more(self) -> bool:
        """Whether bytes follow the payload; reads at most one."""
        return bool(self.read(1))


class _GzipStream:
    """The inflated bytes of one gzip member, produced on demand in bounded chunks."""

    def __init__(self, handle, prefix: bytes, where: str):
        self._handle = handle
        self._where = where
        self._input = prefix  # compressed bytes read but not yet consumed
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper, checks CRC and size

    def _corrupt(self, error: Exception) -> IDXError:
        return IDXError(
            f"{self._where} is a corrupt or truncated gzip stream; download it again. "
            f"Received: {type(error).__name__}: {error}"
        )

    def _inflate(self, limit: int) -> bytes:
        """Up to `limit` (> 0) inflated bytes; `b""` only at the end of the member."""
        while not self._inflater.eof:
            if not self._input:
                self._input = self._handle.read(_CHUNK)
                if not self._input:
                    raise self._corrupt(
                        EOFError("Compressed file ended before the end-of-stream marker was reached")
                    )
            try:
                out = self._inflater.decompress(self._input, limit)
            except zlib.error as error:
                raise self._corrupt(error) from None
            self._input = self._inflater.unconsumed_tail
            if out:
                return out
        return b""

    def read(self, size: int) -> bytes:
        """Returns `size` inflated bytes, fewer only at the end of the member."""
        parts, remaining = [], size
        while remaining > 0:
            part = self._inflate(min(remaining, _CHUNK))
            if not part:
                break
            parts.append(part)
            remaining -= len(part)
        return b"".join(parts)

    def readinto(self, view: memoryview) -> int:
        """Fills `view` as far as the member goes; returns the bytes written."""
        filled = 0
        while filled < len(view):
            part = self._inflate(min(len(view) - filled, _CHUNK))
            if not part:
                break
            view[filled : filled + len(part)] = part
            filled += len(part)
        return filled

    def more(self) -> bool:
        """Whether inflated bytes follow the payload; inflates at most one.

        Raises:
            IDXError: for a corrupt or truncated end of the member, trailing
                bytes after it, or a second gzip member.
        """
        if self._inflate(1):
            return True  # how much more is not worth inflating to find out
        extra = self._inflater.unused_data[:4] + self._handle.read(4)
        if extra:
            if extra[:2] == _GZIP_MAGIC:
                problem = "holds a second gzip member after the first (only one is read)"
            else:
                problem = "has trailing bytes after the end of its gzip stream"
            raise IDXError(
                f"{self._where} {problem}; the file is corrupt or not a single IDX file. "
                f"Received: bytes {extra[:4].hex(' ')!r} after the gzip stream"
            )
        return False


def _open_stream(handle, path: Path, where: str):
    prefix = handle.read(2)
    if prefix == _GZIP_MAGIC:
        return _GzipStream(handle, prefix, where), True
    if path.name.endswith(".gz"):
        raise IDXError(
            f"{where} has a .gz name but is not gzip data (a gzip stream starts with bytes "
            f"1f 8b). Received: first bytes {(prefix + handle.read(2)).hex(' ')!r}"
        )
    return _RawStream(handle, prefix), False


def _read_header(stream, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """Returns `(stored dtype, dims, header size)` after checking the header."""
    magic = stream.read(4)
    if len(magic) < 4:
        raise IDXError(
            f"{where} is too short to hold the 4-byte IDX magic number. Received: {len(magic)} bytes"
        )
    if magic[0] != 0 or magic[1] != 0:
        raise IDXError(
            f"{where} does not start with the IDX magic (two zero bytes, type, ndim); "
            f"it is not an IDX file. Received: first bytes {magic.hex(' ')!r}"
        )
    type_code, ndim = magic[2], magic[3]
    if type_code not in _TYPES:
        known = ", ".join(f"0x{code:02X} ({name})" for code, (_, name) in _TYPES.items())
        raise IDXError(
            f"{where} has an unknown IDX type byte; expected one of {known}. "
            f"Received: type byte 0x{type_code:02X}"
        )
    if ndim == 0:
        raise IDXError(f"{where} declares zero dimensions. Received: ndim=0")
    header = 4 + 4 * ndim
    sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise IDXError(
            f"{where} is truncated inside its header: {ndim} dimensions need "
            f"{header} header bytes. Received: {4 + len(sizes)} bytes"
        )
    dims = tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(ndim))
    return _TYPES[type_code][0], dims, header


def _read_payload(stream, expected: int, grow: bool) -> tuple[np.ndarray, int]:
    """`(uint8 buffer, bytes filled)`: up to `expected` payload bytes of `stream`.

    With `grow`, the buffer starts at 1 MiB and grows by a quarter whenever it is
    full, so memory follows the bytes the stream really holds (at most a quarter
    more) instead of the size its header claims; it ends at exactly `expected`.
    """
    buffer = np.empty(min(expected, _CHUNK) if grow else expected, np.uint8)
    filled = 0
    while True:
        with memoryview(buffer) as view:
            filled += stream.readinto(view[filled:])
        if filled < len(buffer) or len(buffer) == expected:
            return buffer, filled
        # In place where the allocator can (no view of the buffer exists).
        buffer.resize(min(expected, len(buffer) + max(len(buffer) // 4, _CHUNK)), refcheck=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzipped or raw, into a NumPy array.

    Gzip is detected from the content (files named `*.gz` must be gzip) and
    the file must hold exactly one gzip member. All IDX value types are
    accepted (unsigned byte is the one used by MNIST, Fashion-MNIST and
    EMNIST); multi-byte values are converted to native byte order.

    Memory stays within about 2 MiB of the payload size the header declares,
    and of 1.25 times the payload the file really holds (see the module
    docstring): sizes the file cannot hold are refused before allocating, and
    decompression stops where the payload should end.

    Args:
        path: path of the file, e.g. `".../train-images-idx3-ubyte.gz"`.

    Returns:
        A read-only array with the dimensions stored in the header, e.g.
        `uint8` of shape `(60000, 28, 28)` for MNIST training images.

    Raises:
        FileNotFoundError: if `path` does not exist.
        IsADirectoryError: if `path` is a directory.
        IDXError: if the gzip stream is corrupt or truncated or is followed
            by trailing bytes or a second gzip member, the magic number is
            wrong, the type byte is unknown, the header is cut short, the
            dimensions multiply to more bytes than any array can hold or
            than the file could contain, or the payload is shorter or
            longer than the dimensions say. The message names the file.

    Example:

    >>> images = kmtl.data.read_idx("mnist/t10k-images-idx3-ubyte.gz")
    >>> images.shape, images.dtype
    ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    where = f"IDX file {str(path)!r}"
    if path.is_dir():
        raise IsADirectoryError(
            f"{where} is a directory, not a file; put the IDX file at that path instead. "
            f"Received: a directory at {str(path)!r}"
        )
    with open(path, "rb") as handle:
        status = os.fstat(handle.fileno())
        file_size = status.st_size if stat.S_ISREG(status.st_mode) else None  # None: pipe, device
        stream, gzipped = _open_stream(handle, path, where)
        dtype, dims, header = _read_header(stream, where)
        count = 1
        for size in dims:
            count *= size
        expected = count * dtype.itemsize
        described = f"dimensions {dims} of {dtype.itemsize}-byte values need {expected} payload bytes"
        if expected > sys.maxsize:
            raise IDXError(
                f"{where} has a corrupt header: the product of its dimensions overflows, {described}, "
                f"more than the {sys.maxsize} bytes any array can hold. Received: dims={dims}"
            )
        if file_size is not None and not gzipped and file_size - header != expected:
            problem = "truncated" if file_size - header < expected else "longer than its header says"
            raise IDXError(f"{where} is {problem}: {described}. Received: {file_size - header} payload bytes")
        if file_size is not None and gzipped:
            limit = _MAX_DEFLATE_RATIO * file_size + _GZIP_SLACK
            if header + expected > limit:
                raise IDXError(
                    f"{where} has a corrupt header or is truncated: {described}, but a gzip file of "
                    f"{file_size} bytes inflates to at most about {limit} bytes (deflate's maximum "
                    f"ratio is about {_MAX_DEFLATE_RATIO}:1). Received: {file_size} gzip bytes"
                )
        spanned = dtype.itemsize
        for size in dims:
            spanned *= max(size, 1)
        if spanned > sys.maxsize:  # NumPy refuses such dims even when one of them is 0
            raise IDXError(
                f"{where} has a corrupt header: {described}, but NumPy cannot make an array of these "
                f"dimensions (the product of the non-zero ones exceeds {sys.maxsize} bytes). "
                f"Received: dims={dims}"
            )
        # A raw file's size vouches for the payload: allocate it at once. A gzip stream or a pipe
        # could be far shorter than its header claims: grow the buffer only as the data arrives.
        known = file_size is not None and not gzipped
        try:
            payload, filled = _read_payload(stream, expected, grow=not known)
        except MemoryError:
            raise IDXError(
                f"{where} declares more data than fits in memory: {described}. Received: dims={dims}"
            ) from None
        if filled < expected:
            stream.more()  # a second gzip member or trailing bytes explain it better, if any
            raise IDXError(f"{where} is truncated: {described}. Received: {filled} payload bytes")
        if stream.more():
            raise IDXError(
                f"{where} is longer than its header says: {described}. "
                f"Received: more than {expected} payload bytes"
            )
    array = payload.view(dtype.newbyteorder("=")).reshape(dims)
    if dtype.byteorder == ">":  # stored big-endian, not the native order
        array.byteswap(inplace=True)
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
