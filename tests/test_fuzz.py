"""Property-based tests of hostile input: IDX files, configs, the data mixer, the aggregators, `.keras`.

Each test draws its inputs with hypothesis (derandomized, so CI runs the same
examples every time) and checks what must hold for every input: a clear error
of the documented type naming the problem, bounded memory, or the property the
method's docstring promises. The hand-written cases live in the per-module
test files; these tests fuzz around them.
"""

import gzip
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kmtl.data import IDXError, read_idx

# Deterministic examples, no per-example deadline (the first TF call traces); tmp_path is shared
# across the examples of one test, which is fine: every example writes its own file names.
_FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def fuzz(max_examples):
    return settings(_FUZZ, max_examples=max_examples)


MIB = 1 << 20

# --------------------------------------------------------------------------- IDX files

_ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def _header(type_code, dims):
    return bytes([0, 0, type_code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


def _read_traced(path):
    """`(array or None, IDXError message or None, peak traced bytes)` of `read_idx(path)`."""
    tracemalloc.start()
    try:
        try:
            return read_idx(path), None, tracemalloc.get_traced_memory()[1]
        except IDXError as error:
            return None, str(error), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _check_outcome(path, data, decoded):
    """`read_idx(path)` either decodes `decoded` (bytes, as the header lays them out) or names the file.

    Either way, the traced peak stays within 2 MiB (the read buffers) of what the
    data justifies: the decoded bytes, give or take a quarter for a buffer that grows.
    """
    array, message, peak = _read_traced(path)
    if array is not None:
        type_code, ndim = decoded[2], decoded[3]
        dims = tuple(int.from_bytes(decoded[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        assert array.shape == dims
        assert array.nbytes == len(decoded) - 4 - 4 * ndim
        assert array.dtype.itemsize == _ITEMSIZE[type_code]
        assert not array.flags.writeable
    else:
        assert str(path) in message and "Received:" in message, message
    assert peak < 1.25 * len(decoded) + 2 * MIB, (
        f"peak {peak} for {len(decoded)} decoded bytes ({len(data)} in file)"
    )
    return array, message


@fuzz(150)
@given(data=st.binary(max_size=300), gz_name=st.booleans())
def test_random_bytes_are_refused_or_decoded_exactly(tmp_path, data, gz_name):
    path = tmp_path / ("random.gz" if gz_name else "random")
    path.write_bytes(data)
    _check_outcome(path, data, data)


@fuzz(60)
@given(data=st.binary(min_size=3, max_size=300))
def test_random_bytes_inside_a_valid_gzip_stream(tmp_path, data):
    path = tmp_path / "random-gzipped"
    path.write_bytes(gzip.compress(data, mtime=0))
    _check_outcome(path, path.read_bytes(), data)


@st.composite
def _idx_files(draw):
    """`(IDX bytes, dims, type code)` of a valid file with random dims and values."""
    type_code = draw(st.sampled_from(sorted(_ITEMSIZE)))
    dims = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    size = int(np.prod(dims)) * _ITEMSIZE[type_code]
    return _header(type_code, dims) + draw(st.binary(min_size=size, max_size=size)), dims, type_code


@fuzz(120)
@given(file=_idx_files(), gz=st.booleans(), cut=st.floats(0, 1, exclude_max=True))
def test_every_truncation_of_a_valid_file_is_refused(tmp_path, file, gz, cut):
    data, dims, _ = file
    stored = gzip.compress(data, mtime=0) if gz else data
    path = tmp_path / ("cut.gz" if gz else "cut")
    path.write_bytes(stored)
    assert read_idx(path).shape == tuple(dims)  # the whole file is valid
    path.write_bytes(stored[: int(cut * len(stored))])
    array, message = _check_outcome(path, stored, data)
    assert array is None


@fuzz(150)
@given(
    file=_idx_files(),
    gz=st.booleans(),
    position=st.integers(0, 40),
    value=st.integers(0, 255),
)
def test_one_changed_header_byte(tmp_path, file, gz, position, value):
    data, _, _ = file
    header = 4 + 4 * data[3]
    assume(position < header and data[position] != value)
    changed = data[:position] + bytes([value]) + data[position + 1 :]
    path = tmp_path / ("changed.gz" if gz else "changed")
    path.write_bytes(gzip.compress(changed, mtime=0) if gz else changed)
    array, message = _check_outcome(path, changed, changed)
    if position < 2 or (position == 2 and value not in _ITEMSIZE):
        assert array is None and ("IDX magic" in message or "unknown IDX type byte" in message)


@fuzz(150)
@given(
    dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6),
    type_code=st.sampled_from(sorted(_ITEMSIZE)),
    payload=st.integers(0, 4096),
    gz=st.booleans(),
)
def test_forged_dimensions_never_allocate_beyond_the_data(tmp_path, dims, type_code, payload, gz):
    # Incompressible payload bytes: the file is as large as the data it holds.
    data = _header(type_code, dims) + np.random.default_rng(payload).bytes(payload)
    path = tmp_path / ("forged.gz" if gz else "forged")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    array, message = _check_outcome(path, data, data)
    if array is None:
        assert f"dims={tuple(dims)}" in message or "payload bytes" in message or "truncated" in message, (
            message
        )


@fuzz(12)
@given(
    length=st.sampled_from([0, 1000, 3 * MIB, 8 * MIB]),
    factor=st.sampled_from([0.0, 0.5, 1.0, 4.0]),
    stored=st.sampled_from(["raw", "gz"]),
)
def test_header_claiming_much_more_than_a_real_payload(tmp_path, length, factor, stored):
    """A header claiming up to deflate's maximum ratio (~1000x) more than is stored is refused, lean."""
    rng = np.random.default_rng(length)
    payload = rng.bytes(min(length, 64 << 10))  # incompressible, up to 64 KiB
    claim = int(factor * len(payload)) + length  # up to 8 MiB more than stored
    data = _header(0x08, (claim,)) + payload
    path = tmp_path / f"claims-{claim}{'.gz' if stored == 'gz' else ''}"
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0) if stored == "gz" else data)
    array, message = _check_outcome(path, data, data)
    assert (array is None) == (claim != len(payload))


@fuzz(10)
@given(declared=st.integers(0, 3 * MIB), extra=st.integers(1, 12 * MIB))
def test_gzip_bomb_stops_at_the_declared_size(tmp_path, declared, extra):
    """Zeros past the declared payload: refused, with memory bounded by the declared size."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    header = _header(0x08, (declared,))
    path = tmp_path / f"bomb-{declared}-{extra}.gz"
    zeros = bytes(MIB)
    with open(path, "wb") as handle:
        handle.write(deflate.compress(header))
        for start in range(0, declared + extra, MIB):
            handle.write(deflate.compress(zeros[: min(MIB, declared + extra - start)]))
        handle.write(deflate.flush())
    array, message, peak = _read_traced(path)
    assert array is None and "longer than its header says" in message and str(path) in message
    assert peak < declared + 3 * MIB


# Regressions found by the tests above.
@pytest.mark.parametrize("gz", [False, True])
def test_zero_size_dims_numpy_cannot_represent_are_an_idx_error(tmp_path, gz):
    # Was NumPy's bare ValueError "array is too big", without the file's name.
    dims = (0, 5747, 5755, 31526, 1105718)
    data = _header(0x0E, dims)
    path = tmp_path / ("empty.gz" if gz else "empty")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    with pytest.raises(IDXError, match=r"NumPy cannot make an array of these dimensions") as info:
        read_idx(path)
    assert str(path) in str(info.value) and str(info.value).endswith(f"Received: dims={dims}")


def test_gzip_header_claiming_50_times_its_stream_allocates_only_the_stream(tmp_path):
    # Was: the claimed 3.3 MiB allocated up front for a stream holding 64 KiB.
    payload = np.random.default_rng(0).bytes(64 << 10)
    path = tmp_path / "claims-more.gz"
    path.write_bytes(gzip.compress(_header(0x08, (50 * len(payload),)) + payload, mtime=0))
    array, message, peak = _read_traced(path)
    assert (
        array is None
        and "is truncated" in message
        and message.endswith(f"Received: {len(payload)} payload bytes")
    )
    assert peak < 2 * MIB + len(payload)
