"""Property-based tests of hostile input: IDX files, configs, the data mixer, the aggregators, `.keras`.

Each test draws its inputs with hypothesis (derandomized, so CI runs the same
examples every time) and checks what must hold for every input: a clear error
of the documented type naming the problem, bounded memory, or the property the
method's docstring promises. The hand-written cases live in the per-module
test files; these tests fuzz around them.
"""

import gzip
import json
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kmtl_cli
from kmtl import experiment
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


@fuzz(100)
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


@fuzz(80)
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


@fuzz(100)
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


@fuzz(100)
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


@fuzz(25)
@given(
    image_dims=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    image_type=st.sampled_from([0x08, 0x08, 0x09, 0x0D]),
    labels=st.lists(st.integers(0, 255), max_size=5),
    plain=st.booleans(),
)
def test_local_mnist_files_of_the_wrong_shape_or_labels_are_refused(
    tmp_path, image_dims, image_type, labels, plain
):
    """`load_arrays(source="local")` on hostile files: correct arrays, or a ValueError naming the problem."""
    from kmtl.data import sources

    folder = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    (folder / "mnist").mkdir(parents=True)
    size = int(np.prod(image_dims)) * _ITEMSIZE[image_type]
    files = {
        "t10k-images-idx3-ubyte": _header(image_type, image_dims)
        + bytes(range(256)) * (size // 256)
        + bytes(size % 256),
        "t10k-labels-idx1-ubyte": _header(0x08, (len(labels),)) + bytes(labels),
    }
    for name, data in files.items():
        if plain:
            (folder / "mnist" / name).write_bytes(data)
        else:
            (folder / "mnist" / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    try:
        images, loaded = sources.load_arrays("mnist", "test", source="local", data_dir=folder)
    except ValueError as error:
        message = str(error)
        assert "Received:" in message and (str(folder) in message or "'mnist' labels" in message), message
        return
    finally:
        sources.clear_cache()
    assert images.dtype == np.uint8 and images.ndim == 3 and image_type == 0x08
    assert (
        len(images) == len(loaded) == len(labels) and list(loaded) == labels and max(labels, default=0) <= 9
    )


# --------------------------------------------------------------------------- configs

_JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
#: Plausible values of each key, so that the fuzzing gets past the first check.
_PLAUSIBLE = {
    "dataset": st.sampled_from(list(kmtl_cli.DATASETS) + ["Digits", "mnist "]),
    "tasks": st.sampled_from([["digit"], "digit,parity", ["digit", "digit"], ["left"], "", [""], ["item"]]),
    "epochs": st.integers(-2, 3) | st.just(True),
    "batch_size": st.integers(-1, 2**64),
    "loss_weights": st.dictionaries(
        st.sampled_from(["digit", "parity", " digit", "x", "", 1]), _JSON_SCALARS
    ),
    "weighting": st.sampled_from(["pcgrad", "PCGrad", "nash-mtl", "nope", ""])
    | st.fixed_dictionaries(
        {"name": st.sampled_from(["cagrad", "static", "upgrad", "famo", 3])},
        optional={"c": _JSON_SCALARS, "weights": _JSON, "max_exact_tasks": _JSON_SCALARS, "bogus": _JSON},
    ),
    "architecture": st.sampled_from(["hard_sharing", "mmoe", "hard-sharing", "nope"]),
    "trunk": st.sampled_from([None, "mlp", "nope", ""]),
    "optimizer": st.sampled_from(["adam", "sgd", "Adam", "nope", "", "Layer", "keras.layers.Dense"]),
    "learning_rate": _JSON_SCALARS,
    "source": st.sampled_from(["auto", "local", "tfds", "s3"]),
    "seed": st.integers(-1, 2**33),
    "seeds": st.lists(st.integers(-1, 4), max_size=3) | _JSON,
    "train_limit": st.none() | st.integers(-1, 10),
    "validation": st.sampled_from([None, "test", "train[50000:]", "train[:10%]", "train[", "val"]),
    "train_split": st.sampled_from([None, "train[:90%]", "test[:5]", "train[1:2:3]"]),
    "test_split": st.sampled_from([None, "test", "test[-5:]", "test[%]"]),
    "name": st.sampled_from([None, "run", "a/b", "..", ""]),
    "run_name": st.sampled_from([None, "run", "other", "a/b"]),
    "verbose": st.sampled_from([0, 1, 2, 3, "auto", True, "1"]),
    "tensorboard": _JSON_SCALARS,
}


@st.composite
def _configs(draw):
    """A dict of known keys with plausible or junk values, sometimes with an unknown key."""
    keys = draw(st.lists(st.sampled_from(sorted(_PLAUSIBLE)), max_size=6, unique=True))
    config = {key: draw(st.one_of(_PLAUSIBLE[key], _PLAUSIBLE[key], _PLAUSIBLE[key], _JSON)) for key in keys}
    if draw(st.integers(0, 5)) == 0:
        config[draw(st.text(max_size=10) | st.integers() | st.none())] = draw(_JSON)
    return config


def _load_or_value_error(source):
    """`load_config(source)`, or None if it raised a ValueError; any other exception fails the test."""
    try:
        return experiment.load_config(source)
    except ValueError as error:
        assert str(error).strip(), "an empty error message"
        assert len(str(error)) < 20_000, f"a {len(str(error))}-character error message"
        return None


def _check_accepted(raw, config):
    """An accepted config names only known keys and normalises to a fixed point with a hash."""
    unknown = [key for key in raw if key not in kmtl_cli.CONFIG_KEYS]
    assert not unknown, f"unknown key(s) {unknown} accepted"
    assert tuple(config) == experiment.KEYS
    assert experiment.load_config(config) == config
    assert len(experiment.config_hash(config)) == 16


@fuzz(80)
@given(raw=_configs())
def test_config_mappings_are_normalised_or_refused_with_a_value_error(tmp_path, raw):
    raw = dict(raw, out=str(tmp_path / "out"))
    config = _load_or_value_error(raw)
    if config is not None:
        _check_accepted(raw, config)


@fuzz(40)
@given(raw=_configs(), key=st.text(min_size=1, max_size=10))
def test_an_unknown_key_is_named_with_the_allowed_keys(raw, key):
    assume(key not in kmtl_cli.CONFIG_KEYS)
    with pytest.raises(ValueError) as info:
        experiment.load_config(dict(raw, **{key: 1}))
    message = str(info.value)
    if "Unknown option" in message:  # else a bad value came first
        assert repr(key) in message and "'dataset'" in message


@fuzz(60)
@given(raw=_configs(), yaml_file=st.booleans())
def test_config_files_are_read_back_as_their_mapping(tmp_path, raw, yaml_file):
    import yaml

    raw = {key: value for key, value in raw.items() if isinstance(key, str)}
    raw["out"] = str(tmp_path / "out")
    path = tmp_path / ("config.yaml" if yaml_file else "config.json")
    path.write_text(yaml.safe_dump(raw) if yaml_file else json.dumps(raw), encoding="utf-8")
    from_file, from_mapping = _load_or_value_error(path), _load_or_value_error(raw)
    if from_mapping is None:
        assert from_file is None
        return
    if json.loads(json.dumps(raw)) == raw:  # no NaN (NaN != NaN), so both files hold `raw` exactly
        assert from_file == from_mapping


@fuzz(150)
@given(text=st.text(max_size=200), yaml_file=st.booleans())
def test_random_config_text_is_refused_with_a_value_error(tmp_path, text, yaml_file):
    path = tmp_path / ("random.yml" if yaml_file else "random.json")
    path.write_text(text, encoding="utf-8")
    config = _load_or_value_error(path)
    if config is not None:
        assert set(config) == set(experiment.KEYS)


@fuzz(10)
@given(
    prefix=st.sampled_from(["tasks: ", "seeds: ", "weighting: {name: static, weights: ", "loss_weights: "]),
    opener=st.sampled_from(["[", "{a: ", "- ", "!!python/object/apply:os.system ["]),
    depth=st.sampled_from([1, 2, 600, 1200]),  # PyYAML needs ~1 s to fail on 1200 nested "["
    yaml_file=st.booleans(),
)
def test_deep_nesting_and_python_tags_are_a_value_error(tmp_path, prefix, opener, depth, yaml_file):
    closer = {"[": "]", "{a: ": "}", "- ": "", "!!python/object/apply:os.system [": "]"}[opener]
    if yaml_file:
        text = prefix + opener * depth + "1" + closer * depth + ("}" if "{" in prefix else "")
    else:
        text = '{"tasks": ' + "[" * depth + "1" + "]" * depth + "}"
    path = tmp_path / ("deep.yaml" if yaml_file else "deep.json")
    path.write_text(text, encoding="utf-8")
    assert _load_or_value_error(path) is None


@fuzz(12)
@given(
    key=st.sampled_from(["tasks", "seeds", "loss_weights", "weighting", "nope", "data_dir"]),
    width=st.integers(2, 10),
    depth=st.integers(2, 12),
)
def test_yaml_alias_expansion_is_bounded(tmp_path, key, width, depth):
    """Billion laughs: each level repeats the previous one `width` times, `width ** depth` in all."""
    levels = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, depth):
        levels.append(f"&l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    if key == "weighting":
        text = "weighting: {name: static, weights: [" + ", ".join(levels) + "]}\n"
    else:
        text = f"{key}: [" + ", ".join(levels) + "]\n"
    path = tmp_path / f"laughs-{key}-{width}-{depth}.yaml"
    path.write_text(text, encoding="utf-8")
    tracemalloc.start()
    try:
        assert _load_or_value_error(path) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * MIB


# --------------------------------------------------------------------------- the data mixer

_NUMBERS = (
    st.integers(-2, 6)
    | st.sampled_from([2**31, 2**63, 2**70, True, 2.0, float("nan"), float("inf"), 1e-300, 1e300, "4", None])
    | st.floats(-1, 1e3)
)


@st.composite
def _mix_arguments(draw):
    """`(datasets, kwargs, labels)`: 1 to 3 small tasks with random sizes, some deliberately wrong."""
    import tensorflow as tf

    names = draw(
        st.lists(st.sampled_from(["a", "b", "c", "not valid", "9"]), min_size=0, max_size=3, unique=True)
    )
    width = draw(st.sampled_from([2, 3]))
    datasets, labels = {}, {}
    for index, name in enumerate(names):
        size = draw(st.integers(1, 12))
        fault = draw(
            st.sampled_from([None] * 6 + ["key", "batched", "width", "dtype", "not_a_dataset", "empty"])
        )
        x = np.full((size, width + (fault == "width")), index, np.float32 if fault != "dtype" else np.int32)
        y = np.arange(size, dtype=np.int64) + 100 * index
        labels[name] = set(y.tolist())
        key = name if fault != "key" else name + "_other"
        dataset = tf.data.Dataset.from_tensor_slices((x, {key: y}))
        if fault == "batched":
            dataset = dataset.batch(2)
        elif fault == "empty":
            dataset = dataset.take(0)
        datasets[name] = dataset if fault != "not_a_dataset" else (x, {key: y})
    kwargs = {}
    for argument in ("batch_size", "epoch_length", "num_epochs", "temperature", "seed"):
        if draw(st.booleans()):
            kwargs[argument] = draw(_NUMBERS)
    kwargs["sampler"] = draw(
        st.sampled_from(["uniform", "proportional", "annealed", "round_robin", "random"])
    )
    kwargs["routed"] = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        kwargs["sizes"] = draw(st.dictionaries(st.sampled_from(["a", "b", "z"]), _NUMBERS, max_size=2))
    return datasets, kwargs, labels


@fuzz(40)
@given(arguments=_mix_arguments())
def test_mix_gives_a_clear_error_or_correct_batches(arguments):
    from kmtl.data import mix

    datasets, kwargs, labels = arguments
    try:
        mixed = mix(datasets, **kwargs)
    except (ValueError, TypeError) as error:
        assert "Received" in str(error), str(error)
        return
    batch_size = kwargs.get("batch_size", 256)
    steps = int(mixed.cardinality())
    assert steps >= 1
    for x, y, mask in mixed.take(3):
        assert sorted(y) == sorted(mask) == sorted(datasets)
        masks = np.stack([mask[task].numpy() for task in sorted(datasets)])
        assert set(np.unique(masks)) <= {0.0, 1.0}
        np.testing.assert_array_equal(masks.sum(0), 1.0)  # every example belongs to one task
        assert 1 <= masks.shape[1] <= batch_size
        for row, task in enumerate(sorted(datasets)):
            own = masks[row] == 1
            assert set(y[task].numpy()[own].tolist()) <= labels[task]
            inputs = x[task] if kwargs["routed"] else x
            # Each task's inputs are filled with its index in `datasets` (routed: zeros elsewhere).
            expected = list(datasets).index(task)
            np.testing.assert_array_equal(inputs.numpy()[own], expected)
    if kwargs["sampler"] != "annealed":
        epoch = kwargs.get("epoch_length") or sum(len(labels[t]) for t in datasets)
        assert steps == -(-epoch // batch_size)


# --------------------------------------------------------------------------- aggregators

#: Every strategy is built for this many tasks; a smaller T pads with absent tasks.
MAX_TASKS = 8
_STRATEGIES = {}


def _gram_strategy(name, **kwargs):
    """A built strategy and its weights function on a padded float64 Gram matrix (traced once)."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _STRATEGIES:
        import tensorflow as tf

        import kmtl

        strategy = kmtl.weighting.get(name, **kwargs)
        strategy.build([f"t{i}" for i in range(MAX_TASKS)])
        function = tf.function(
            lambda gram, present: strategy.weights_from_gram(
                gram, tf.ones(MAX_TASKS, tf.float64), present, tf.constant(0, tf.int64), strategy.state()
            )[0]
        )
        _STRATEGIES[key] = strategy, function
    return _STRATEGIES[key]


def _weights(name, G, **kwargs):
    """The strategy's task weights for the rows of `G` (float64), absent padding checked to be 0."""
    strategy, function = _gram_strategy(name, **kwargs)
    rows = np.zeros((MAX_TASKS, G.shape[1]))
    rows[: len(G)] = G
    present = np.arange(MAX_TASKS) < len(G)
    alpha = np.asarray(function(rows @ rows.T, present), np.float64)
    assert np.all(np.isfinite(alpha)), f"{name}: non-finite weights {alpha}"
    assert np.all(alpha[len(G) :] == 0), f"{name}: absent tasks got weights {alpha[len(G) :]}"
    return alpha[: len(G)]


@st.composite
def _gradients(draw, max_tasks=MAX_TASKS, max_dim=64):
    """A T x D matrix, 2 <= T <= 8, 1 <= D <= 64, of one of several hard shapes, norms 1e-3..1e3."""
    T = draw(st.integers(2, max_tasks))
    D = draw(st.integers(1, max_dim))
    kind = draw(st.sampled_from(["gaussian", "parallel", "opposite", "low_rank", "zero_row", "conflicting"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    G = rng.normal(size=(T, D))
    if kind == "parallel":
        G = rng.uniform(0.5, 2, (T, 1)) * (rng.normal(size=D) + 1e-4 * G)
    elif kind == "opposite":
        G[1] = -rng.uniform(0.1, 10) * G[0]
    elif kind == "low_rank":
        rank = draw(st.integers(1, max(1, min(T, D) - 1)))
        G = rng.normal(size=(T, rank)) @ rng.normal(size=(rank, D))
    elif kind == "conflicting":
        G = G - 0.9 * G.mean(0)
    norms = np.linalg.norm(G, axis=1, keepdims=True)
    G = G / np.where(norms > 0, norms, 1) * 10.0 ** rng.uniform(-3, 3, (T, 1))
    if kind == "zero_row":
        G[draw(st.integers(0, T - 1))] = 0
    assume(np.abs(G).max() > 0)
    return G


def _summary(G):
    return f"G of shape {G.shape}, row norms {np.linalg.norm(G, axis=1)}"


@fuzz(25)
@given(G=_gradients())
def test_upgrad_update_conflicts_with_no_task(G):
    d = _weights("upgrad", G) @ G
    norms = np.linalg.norm(G, axis=1)
    if np.linalg.norm(d) > 1e-12 * norms.max():
        nonzero = norms > 0
        cosines = G[nonzero] @ d / (norms[nonzero] * np.linalg.norm(d))
        assert cosines.min() >= -1e-8, f"min cosine {cosines.min():.2e}; {_summary(G)}"


def _min_norm_reference(G):
    """`min_{w in simplex} |G^T w|^2` by scipy's SLSQP on unit-scaled gradients (tests only)."""
    import scipy.optimize

    scale = np.linalg.norm(G, axis=1).max()
    K = (G / scale) @ (G / scale).T
    T = len(G)
    best = np.inf
    for start in (np.full(T, 1.0 / T), np.eye(T)[np.argmin(np.diag(K))]):
        result = scipy.optimize.minimize(
            lambda w: w @ K @ w,
            start,
            jac=lambda w: 2 * K @ w,
            bounds=[(0, 1)] * T,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(T)}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        w = np.clip(result.x, 0, None) / np.clip(result.x, 0, None).sum()
        best = min(best, w @ K @ w)
    return best * scale**2


@fuzz(25)
@given(G=_gradients())
def test_mgda_finds_the_min_norm_point_of_the_convex_hull(G):
    alpha = _weights("mgda", G)
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-12, f"alpha={alpha} not on the simplex"
    d = alpha @ G
    scale = np.linalg.norm(G, axis=1).max() ** 2
    # At least as short as scipy's point (which is feasible), up to scipy's own tolerance.
    reference = _min_norm_reference(G)
    assert d @ d <= reference + 1e-9 * scale, f"|d|^2={d @ d:.6e} > scipy's {reference:.6e}; {_summary(G)}"
    # And optimal: the KKT conditions g_t . d >= |d|^2 for every task.
    assert (G @ d - d @ d).min() >= -1e-9 * scale, f"KKT violated; {_summary(G)}"


@fuzz(12)
@given(G=_gradients(), c=st.sampled_from([0.1, 0.4, 1.0, 5.0]))
def test_cagrad_stays_in_its_ball_and_improves_the_worst_task(G, c):
    d = _weights("cagrad", G, c=c, rescale=0) @ G
    g0 = G.mean(0)
    norms = np.linalg.norm(G, axis=1)
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9) + 1e-12 * norms.max()
    # g_0 itself lies in the ball, so the optimum's worst task is at least as well off.
    tolerance = 1e-9 * norms.max() * max(np.linalg.norm(g0), 1e-300)
    assert (G @ d).min() >= (G @ g0).min() - tolerance, f"worse than g_0; {_summary(G)}"


@fuzz(25)
@given(G=_gradients())
def test_nash_mtl_solves_the_bargaining_equations(G):
    strategy, _ = _gram_strategy("nash_mtl")
    alpha = _weights("nash_mtl", G)
    norms = np.linalg.norm(G, axis=1)
    zero = norms == 0
    assert np.all(alpha[zero] == 0), "a zero gradient got a weight"
    K = G @ G.T
    # (K alpha)_t alpha_t + ridge |g_t|^2 alpha_t^2 = 1 for every task with a direction.
    ridged = ((K @ alpha) * alpha + strategy.ridge * norms**2 * alpha**2)[~zero]
    assert np.abs(ridged - 1).max() < 1e-6, f"equations off by {np.abs(ridged - 1).max():.2e}; {_summary(G)}"
    assert np.all(alpha[~zero] > 0)


@fuzz(12)
@given(G=_gradients())
def test_imtl_projections_are_equal_when_the_gradients_are_independent(G):
    alpha = _weights("imtl", G)
    norms = np.linalg.norm(G, axis=1)
    nonzero = norms > 0
    assert np.all(alpha[~nonzero] == 0)
    units = G[nonzero] / norms[nonzero, None]
    singular = np.linalg.svd(units, compute_uv=False)
    if nonzero.sum() <= G.shape[1] and singular.min() > 1e-3:  # independent, well conditioned
        assert abs(alpha.sum() - 1) < 1e-9
        projections = units @ (alpha @ G)
        spread = np.ptp(projections) / np.abs(projections).max()
        assert spread < 1e-7, f"projections {projections}; {_summary(G)}"


@fuzz(20)
@given(G=_gradients())
def test_pcgrad_without_conflicts_is_the_sum_and_matches_the_surgery(G):
    from _weighting_helpers import pcgrad_reference

    from kmtl.weighting import _random

    strategy, _ = _gram_strategy("pcgrad", seed=3)
    alpha = _weights("pcgrad", G, seed=3)
    rows = np.zeros((MAX_TASKS, G.shape[1]))
    rows[: len(G)] = G
    orders = _random.orders(_random.key(strategy.seed, 0), MAX_TASKS).numpy()
    reference = pcgrad_reference(rows, orders)
    norms = np.linalg.norm(G, axis=1)
    error = np.linalg.norm(alpha @ G - reference) / norms.max()
    assert error < 1e-9, f"relative error {error:.2e}; {_summary(G)}"
    if (G @ G.T).min() >= 0:
        np.testing.assert_array_equal(alpha, np.ones(len(G)))


@fuzz(6)
@given(G=_gradients(), power=st.integers(-20, 20))
def test_scale_free_strategies_are_scale_free(G, power):
    """`alpha(c G) = alpha(G)` (Nash-MTL: `alpha(G) / c`), as their docstrings promise; c a power of 2."""
    c = 2.0**power
    for name, kwargs, exponent in [
        ("upgrad", {}, 0),
        ("mgda", {}, 0),
        ("imtl", {}, 0),
        ("aligned_mtl", {}, 0),
        ("pcgrad", {"seed": 3}, 0),
        ("cagrad", {"rescale": 0}, 0),
        ("nash_mtl", {}, -1),
    ]:
        alpha, scaled = _weights(name, G, **kwargs), _weights(name, c * G, **kwargs)
        # Relative to the update: rows of tiny norm may carry weights that do not matter.
        norms = np.linalg.norm(G, axis=1)
        gap = np.linalg.norm((scaled * c**-exponent - alpha) @ G) / max(
            np.linalg.norm(alpha @ G), 1e-6 * norms.max() * np.abs(alpha).max(), 1e-300
        )
        assert gap < 1e-6, f"{name}: alpha(cG) differs by {gap:.2e} for c=2**{power}; {_summary(G)}"


@fuzz(10)
@given(G=_gradients())
def test_aligned_mtl_and_gradvac_give_finite_weights(G):
    for name, kwargs in [("aligned_mtl", {}), ("gradvac", {"seed": 1, "beta": 0.5})]:
        _weights(name, G, **kwargs)  # finite, absent tasks 0 (checked there)
    # Aligned-MTL: orthogonal gradients are rescaled to the smallest norm.
    norms = np.linalg.norm(G, axis=1)
    orthogonal = np.linalg.qr(np.random.default_rng(0).normal(size=(max(G.shape[1], len(G)), len(G))))[0].T
    Q = orthogonal * norms[:, None]
    if norms.min() > 0:
        alpha = _weights("aligned_mtl", Q)
        np.testing.assert_allclose(alpha, norms.min() / norms, rtol=1e-8)


@fuzz(10)
@given(G=_gradients(max_dim=16), leak=st.sampled_from([0.0, 0.3, 1.0]))
def test_graddrop_keeps_every_coordinate_the_tasks_agree_on(G, leak):
    import kmtl

    strategy = kmtl.weighting.GradDrop(leak=leak, seed=0)
    update = np.asarray(strategy.aggregate(G), np.float64)
    assert np.all(np.isfinite(update))
    agree = np.all(G > 0, axis=0) | np.all(G < 0, axis=0)
    np.testing.assert_allclose(update[agree], G.sum(0)[agree], rtol=1e-5)
    if leak == 1.0:
        np.testing.assert_allclose(update, G.sum(0), rtol=1e-5, atol=1e-6 * np.abs(G).max())


# --------------------------------------------------------------------------- .keras files


@pytest.mark.parametrize("where", ["top", "nested"])
def test_load_keras_refuses_a_lambda_layer_holding_python_code(tmp_path, where):
    """A crafted `.keras` whose config carries a serialized Python function: Keras's safe_mode refuses it."""
    import keras

    from kmtl import export

    marker = tmp_path / "executed"
    inputs = keras.Input((2,))
    # The function would write `marker` if it were ever deserialized and run.
    layer = keras.layers.Lambda(lambda x, path=str(marker): (open(path, "w").close(), x)[1])
    if where == "nested":
        inner = keras.Sequential([keras.Input((2,)), layer])
        model = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))
    else:
        model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    path = tmp_path / "crafted.keras"
    model.save(path)
    marker.unlink(missing_ok=True)  # saving traced the function
    with pytest.raises(ValueError, match="safe_mode"):
        export.load_keras(path)
    assert not marker.exists()


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


@pytest.mark.parametrize(
    "weights, fragment",
    [
        ({1: 0.5}, "task names must be non-empty strings. Received: 1"),
        ({"digit": 1, " digit": 0}, "'digit' is given twice"),
    ],
)
def test_loss_weights_keys_that_are_not_distinct_task_names(weights, fragment):
    # Were an AttributeError (a YAML integer key) and a silent overwrite (the second weight won).
    with pytest.raises(ValueError, match=fragment):
        experiment.load_config({"loss_weights": weights})


@pytest.mark.parametrize(
    "name, text",
    [("deep.json", '{"tasks": ' + "[" * 5000 + "]" * 5000 + "}"), ("deep.yaml", "tasks: " + "{a: " * 2000)],
)
def test_deeply_nested_config_is_a_value_error(tmp_path, name, text):
    # Was a RecursionError.
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="nests its values too deeply"):
        experiment.load_config(tmp_path / name)


def test_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    # Was a 580 kB error message at 5 levels (the repr of the expanded lists), 6 GB at 9.
    levels = ["&a0 [" + ", ".join(["lol"] * 10) + "]"] + [
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)
    ]
    path = tmp_path / "laughs.yaml"
    path.write_text("tasks: [" + ", ".join(levels) + "]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"aliases expand to \d+ values, more than the 10000"):
        experiment.load_config(path)


def test_a_config_path_without_end_is_read_boundedly():
    # Was an unbounded read (all memory) of /dev/zero.
    with pytest.raises(ValueError, match="larger than 1048576 characters|not valid JSON|Cannot read"):
        experiment.load_config("/dev/zero")


def test_graddrop_keeps_a_coordinate_every_task_pushes_down_when_the_draw_is_zero():
    import kmtl

    # Seed 0's first draw is exactly 0.0: purity 0 is not < 0, so the column was dropped (update 0).
    G = np.array([[-299.59424297], [-4.36329579]])
    np.testing.assert_allclose(kmtl.weighting.GradDrop(seed=0).aggregate(G), G.sum(0))


def test_graddrop_keeps_unanimous_float16_coordinates():
    import kmtl

    # A draw near 1 cast to float16 became 1.0: purity 1 is not > 1, so 2 of these columns were dropped.
    G = (np.abs(np.random.default_rng(0).normal(size=(2, 20000))) + 0.1).astype(np.float16)
    update = np.asarray(kmtl.weighting.GradDrop(seed=0).aggregate(G))
    assert np.all(update != 0)


def _two_tasks():
    import tensorflow as tf

    return {
        name: tf.data.Dataset.from_tensor_slices((np.zeros((n, 2), np.float32), {name: np.arange(n)}))
        for name, n in (("a", 100), ("b", 1000))
    }


def test_mix_proportional_at_a_low_temperature_samples_the_largest_task():
    from kmtl.data import mix

    # n ** (1 / 0.001) overflowed to inf and the probabilities to NaN: "Selector index out of range".
    _, _, mask = next(iter(mix(_two_tasks(), sampler="proportional", temperature=1e-3, batch_size=8)))
    np.testing.assert_array_equal(mask["b"], np.ones(8))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"seed": 2**70}, r"`seed` must be an integer in \[0, 2\*\*63\)"),  # was accepted
        ({"epoch_length": 2**70}, "more than tf.data can count"),  # was a StagingError
        ({"sampler": "annealed", "num_epochs": 2**62}, "more than tf.data can count"),
    ],
)
def test_mix_refuses_counts_beyond_int64(kwargs, fragment):
    from kmtl.data import mix

    with pytest.raises(ValueError, match=fragment):
        mix(_two_tasks(), batch_size=8, **kwargs)
