"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST): two objects per image.

Each composite image holds two source images that partly overlap; the tasks
are `left` (the class of the top-left object) and `right` (the class of the
bottom-right object). Two published recipes are provided.

`kmtl.data.multi_mnist` (a `tf.data` pipeline) and
`kmtl.data.multi_mnist_arrays` (NumPy arrays) are defined here; this module,
`kmtl.data.recipes`, also holds `compose`, `clear_memory_cache` and the
recipe constants.

`recipe="sener"` (Sener & Koltun, 2018, the MultiMNIST of "Multi-Task
Learning as Multi-Objective Optimization"; construction as in the authors'
released loader):

1. one composite per source image: source image `i` is the left object and
   its partner is drawn uniformly at random (with replacement) from the same
   split;
2. a 36x36 canvas holds the left image at rows/columns 0..27 and the partner
   offset by 6 px on both axes (rows/columns 6..33);
3. the overlap takes the pixel-wise maximum of the two images;
4. the canvas is resized to 28x28 by nearest-neighbour sampling (output pixel
   `k` reads canvas pixel `floor((k + 0.5) * 36 / 28)`, as PIL's NEAREST
   filter does; the authors' old `scipy.misc.imresize` also byte-rescaled the
   image, which is skipped here);
5. pixels are normalised with mean 0.1307 and std 0.3081 (the MNIST training
   statistics the authors used).

`recipe="pareto"` (Lin et al., 2019, the MultiMNIST, MultiFashion and
Multi-(Fashion+MNIST) sets of Pareto MTL):

1. two composites per source image (the released sets hold 120,000 train and
   20,000 test images): source image `i` is the left object of composites `i`
   and `N + i`; each partner is drawn at random among the images of a
   *different* class (label values differ, for every base);
2. a 36x36 canvas, not resized: the left object is placed at the top-left
   corner shifted by 0..4 px down and right, the right object at the
   bottom-right corner (offset 8 px) shifted by 0..4 px up and left, each
   shift drawn uniformly per axis; the overlap takes the pixel-wise maximum;
3. pixels are scaled to [0, 1].

Bases: `"mnist"` (both objects from MNIST), `"fashion"` (both from
Fashion-MNIST), `"fashion+mnist"` (left from Fashion-MNIST, right from MNIST),
for either recipe.

Generation is vectorised in NumPy and deterministic for a `seed`. Results are
cached in memory per process and, when a writable cache directory exists, in
an `.npz` file written atomically; a cache file that cannot be read or does
not match the request is rebuilt.

References:
    Sener, O. and Koltun, V. "Multi-Task Learning as Multi-Objective
    Optimization." NeurIPS 2018. arXiv:1810.04650.
    Lin, X., Zhen, H.-L., Li, Z., Zhang, Q. and Kwong, S. "Pareto
    Multi-Task Learning." NeurIPS 2019. arXiv:1912.12854.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import warnings
from typing import NamedTuple

import numpy as np

from kmtl.data.sources import BASE_SOURCES

logger = logging.getLogger(__name__)

RECIPES = ("sener", "pareto")
BASES = tuple(BASE_SOURCES)  # "mnist", "fashion", "fashion+mnist"
SPLITS = ("train", "test")

SENER_MEAN = 0.1307
SENER_STD = 0.3081
CANVAS = 36
SENER_OFFSET = 6
SENER_SIZE = 28
PARETO_SHIFT = 4

_CACHE_VERSION = 1
_SPLIT_PATTERN = re.compile(r"^(train|test)(\[[^\]]*\])?$")
_MEMORY_CACHE: dict[tuple, "MultiMnistArrays"] = {}
# Show a progress bar once building has taken longer than this (seconds).
_PROGRESS_AFTER = 2.0
# Number of source images per generation chunk.
_CHUNK = 8192


class MultiMnistArrays(NamedTuple):
    """Composite images and their provenance.

    Attributes:
        images: uint8 `[M, H, W]` composites, before normalisation
            (28x28 for `sener`, 36x36 for `pareto`).
        labels: `{"left": int64 [M], "right": int64 [M]}`.
        left_index: int64 `[M]`, index of the left object in its source split.
        right_index: int64 `[M]`, index of the right object in its source split.
        left_offset: int64 `[M, 2]`, (row, column) of the left object's
            top-left corner on the 36x36 canvas.
        right_offset: int64 `[M, 2]`, same for the right object.
    """

    images: np.ndarray
    labels: dict
    left_index: np.ndarray
    right_index: np.ndarray
    left_offset: np.ndarray
    right_offset: np.ndarray


def _check_choice(value, choices, argument: str) -> str:
    if value not in choices:
        raise ValueError(
            f"Unknown MultiMNIST {argument}. Expected one of {list(choices)}. Received: {argument}={value!r}"
        )
    return value


def _check_split(split) -> str:
    if not isinstance(split, str) or not _SPLIT_PATTERN.match(split.replace(" ", "")):
        raise ValueError(
            "Unknown MultiMNIST split. Expected 'train' or 'test', optionally "
            f"sliced like 'train[:1000]'. Received: split={split!r}"
        )
    return split.replace(" ", "")


def _sources(base: str) -> tuple[str, str]:
    return BASE_SOURCES[base]


def _nearest_rows() -> np.ndarray:
    """Canvas rows (or columns) that nearest-neighbour resizing 36 -> 28 reads."""
    return np.floor((np.arange(SENER_SIZE) + 0.5) * CANVAS / SENER_SIZE).astype(np.int64)


def _draw_pairs(recipe, left_labels, right_labels, rng):
    """Returns left indices, right indices and canvas offsets of each composite."""
    n_left, n_right = len(left_labels), len(right_labels)
    if recipe == "sener":
        left_index = np.arange(n_left, dtype=np.int64)
        right_index = rng.integers(0, n_right, size=n_left, dtype=np.int64)
        left_offset = np.zeros((n_left, 2), np.int64)
        right_offset = np.full((n_left, 2), SENER_OFFSET, np.int64)
        return left_index, right_index, left_offset, right_offset
    if len(np.unique(right_labels)) < 2:
        raise ValueError(
            "The 'pareto' recipe pairs objects of different classes, so the right "
            "source needs at least two classes. Received: a source split with the "
            f"single class {np.unique(right_labels).tolist()}"
        )
    left_index = np.tile(np.arange(n_left, dtype=np.int64), 2)
    right_index = rng.integers(0, n_right, size=left_index.size, dtype=np.int64)
    same = np.flatnonzero(right_labels[right_index] == left_labels[left_index])
    while same.size:  # redraw partners of equal class until none is left
        right_index[same] = rng.integers(0, n_right, size=same.size, dtype=np.int64)
        same = same[right_labels[right_index[same]] == left_labels[left_index[same]]]
    shifts = rng.integers(0, PARETO_SHIFT + 1, size=(left_index.size, 4), dtype=np.int64)
    left_offset = shifts[:, :2]
    right_offset = (CANVAS - SENER_SIZE) - shifts[:, 2:]
    return left_index, right_index, np.ascontiguousarray(left_offset), right_offset


def compose(left_images, right_images, left_offset, right_offset, resize=False):
    """Places image pairs on 36x36 canvases, taking the pixel-wise maximum.

    Args:
        left_images: uint8 `[M, 28, 28]`, the left objects.
        right_images: uint8 `[M, 28, 28]`, the right objects.
        left_offset: int `[M, 2]` (row, column) of each left object's corner,
            each in 0..8.
        right_offset: int `[M, 2]`, same for the right objects.
        resize: whether to resize the canvases to 28x28 by nearest neighbour.

    Returns:
        uint8 `[M, 36, 36]` canvases, or `[M, 28, 28]` when `resize`.

    Example:

    >>> import numpy as np
    >>> a = np.full((1, 28, 28), 7, np.uint8)
    >>> compose(a, a, np.zeros((1, 2), int), np.full((1, 2), 6)).shape
    (1, 36, 36)
    """
    count = len(left_images)
    canvas = np.zeros((count, CANVAS, CANVAS), np.uint8)
    size = left_images.shape[1]
    for images, offsets in ((left_images, left_offset), (right_images, right_offset)):
        offsets = np.asarray(offsets)
        if offsets.min(initial=0) < 0 or offsets.max(initial=0) > CANVAS - size:
            raise ValueError(
                f"Offsets must lie in 0..{CANVAS - size} so that the object stays on "
                f"the canvas. Received: offsets in {offsets.min()}..{offsets.max()}"
            )
        codes = offsets[:, 0] * CANVAS + offsets[:, 1]
        for code in np.unique(codes):
            rows = np.flatnonzero(codes == code)
            top, left = divmod(int(code), CANVAS)
            window = canvas[rows, top : top + size, left : left + size]
            canvas[rows, top : top + size, left : left + size] = np.maximum(window, images[rows])
    if resize:
        grid = _nearest_rows()
        canvas = canvas[:, grid[:, None], grid[None, :]]
    return canvas


def _build(recipe, base, split, seed, source, data_dir) -> MultiMnistArrays:
    from kmtl.data import load_arrays  # local import: kmtl.data imports this module

    start = time.perf_counter()
    progress = None
    left_name, right_name = _sources(base)
    left_images, left_labels = load_arrays(left_name, split=split, source=source, data_dir=data_dir)
    if right_name == left_name:
        right_images, right_labels = left_images, left_labels
    else:
        right_images, right_labels = load_arrays(right_name, split=split, source=source, data_dir=data_dir)
    if len(left_labels) == 0 or len(right_labels) == 0:
        raise ValueError(f"MultiMNIST needs a non-empty source split. Received: split={split!r}")
    rng = np.random.default_rng(seed)
    left_index, right_index, left_offset, right_offset = _draw_pairs(
        recipe, np.asarray(left_labels), np.asarray(right_labels), rng
    )
    total = left_index.size
    size = SENER_SIZE if recipe == "sener" else CANVAS
    images = np.empty((total, size, size), np.uint8)
    for begin in range(0, total, _CHUNK):
        end = min(begin + _CHUNK, total)
        images[begin:end] = compose(
            left_images[left_index[begin:end]],
            right_images[right_index[begin:end]],
            left_offset[begin:end],
            right_offset[begin:end],
            resize=recipe == "sener",
        )
        if progress is None and time.perf_counter() - start > _PROGRESS_AFTER:
            import keras

            print(f"Building MultiMNIST ({recipe}, {base}, {split}): {total} composites")
            progress = keras.utils.Progbar(total, unit_name="composite")
        if progress is not None:
            progress.update(end)
    labels = {
        "left": np.asarray(left_labels, np.int64)[left_index],
        "right": np.asarray(right_labels, np.int64)[right_index],
    }
    logger.info("Built MultiMNIST %s/%s/%s in %.2f s", recipe, base, split, time.perf_counter() - start)
    return MultiMnistArrays(images, labels, left_index, right_index, left_offset, right_offset)


def _resolve_cache_dir(cache_dir, data_dir):
    if cache_dir is False:
        return None
    if cache_dir is not None:
        return os.fspath(cache_dir)
    # Not under the data root: that folder is often shared or read-only, and
    # caches run to 150 MB.
    return os.environ.get("KMTL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kmtl")


def _cache_name(recipe, base, split, seed, source) -> str:
    split_slug = re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")
    base_slug = base.replace("+", "_and_")
    return f"multi_mnist-{recipe}-{base_slug}-{split_slug}-seed{seed}-{source}-v{_CACHE_VERSION}.npz"


def _meta(recipe, base, split, seed, source) -> np.ndarray:
    return np.array(f"{_CACHE_VERSION}|{recipe}|{base}|{split}|{seed}|{source}")


def _read_cache(path, meta, recipe) -> MultiMnistArrays:
    """Loads and validates a cache file; raises on any inconsistency."""
    with np.load(path, allow_pickle=False) as data:  # reading checks each member's CRC
        arrays = {key: data[key] for key in data.files}
    if str(arrays.get("meta")) != str(meta):
        raise ValueError(f"metadata {arrays.get('meta')!r} does not match {meta!r}")
    images = arrays["images"]
    size = SENER_SIZE if recipe == "sener" else CANVAS
    count = images.shape[0]
    expected = {
        "images": ((count, size, size), np.uint8),
        "left": ((count,), np.int64),
        "right": ((count,), np.int64),
        "left_index": ((count,), np.int64),
        "right_index": ((count,), np.int64),
        "left_offset": ((count, 2), np.int64),
        "right_offset": ((count, 2), np.int64),
    }
    for key, (shape, dtype) in expected.items():
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            raise ValueError(f"array {key!r} has shape {arrays[key].shape} {arrays[key].dtype}")
    if count == 0 or min(arrays["left"].min(), arrays["right"].min()) < 0:
        raise ValueError("empty arrays or negative labels")
    return MultiMnistArrays(
        images,
        {"left": arrays["left"], "right": arrays["right"]},
        arrays["left_index"],
        arrays["right_index"],
        arrays["left_offset"],
        arrays["right_offset"],
    )


def _write_cache(path, meta, result: MultiMnistArrays) -> None:
    """Writes the cache atomically (temporary file + rename); skips unwritable dirs."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".multi_mnist-", suffix=".tmp")
    except OSError as error:
        logger.debug("MultiMNIST cache directory %s is not writable: %s", directory, error)
        return
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(
                stream,
                meta=meta,
                images=result.images,
                left=result.labels["left"],
                right=result.labels["right"],
                left_index=result.left_index,
                right_index=result.right_index,
                left_offset=result.left_offset,
                right_offset=result.right_offset,
            )
        os.replace(temporary, path)
    except OSError as error:
        logger.debug("Could not write the MultiMNIST cache %s: %s", path, error)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def multi_mnist_arrays(
    split: str = "train",
    recipe: str = "sener",
    base: str = "mnist",
    seed: int = 0,
    source: str = "auto",
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> MultiMnistArrays:
    """Builds (or loads from cache) the MultiMNIST composites as NumPy arrays.

    See the module docstring for the two recipes and their sources.

    Args:
        split: `"train"` or `"test"`, optionally sliced (`"train[:1000]"`); the
            slice applies to the source images before pairing.
        recipe: `"sener"` (28x28, one composite per source image) or
            `"pareto"` (36x36, two per source image, classes differ).
        base: `"mnist"`, `"fashion"` or `"fashion+mnist"` (left object from
            Fashion-MNIST, right from MNIST).
        seed: seed of the pairing and shifts.
        source: source of the base images, passed to `kmtl.data.load_arrays`.
        data_dir: data root, passed to `kmtl.data.load_arrays`.
        cache_dir: directory of the `.npz` cache. Default: `$KMTL_CACHE_DIR`,
            else `~/.cache/kmtl` (not the data root, which may be shared or
            read-only); `False` disables the file cache. An unwritable directory is skipped (the in-memory
            cache remains).

    Returns:
        A `MultiMnistArrays` named tuple (`images` uint8 before
        normalisation, `labels` dict, source indices and canvas offsets).

    Raises:
        ValueError: unknown `split`, `recipe` or `base`, or a bad `seed`.
        FileNotFoundError: the source files are missing (from `load_arrays`).

    Example:

    >>> arrays = kmtl.data.multi_mnist_arrays("test[:100]", recipe="pareto")
    >>> arrays.images.shape, sorted(arrays.labels)
    ((200, 36, 36), ['left', 'right'])
    """
    split = _check_split(split)
    _check_choice(recipe, RECIPES, "recipe")
    _check_choice(base, BASES, "base")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer. Received: seed={seed!r}")
    seed = int(seed)
    key = (recipe, base, split, seed, source, None if data_dir is None else os.fspath(data_dir))
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    directory = _resolve_cache_dir(cache_dir, data_dir)
    path = meta = None
    result = None
    if directory is not None:
        path = os.path.join(directory, _cache_name(recipe, base, split, seed, source))
        meta = _meta(recipe, base, split, seed, source)
        if os.path.exists(path):
            try:
                result = _read_cache(path, meta, recipe)
            except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt
                warnings.warn(
                    f"Ignoring the unreadable MultiMNIST cache file {path} ({error}); rebuilding it.",
                    stacklevel=2,
                )
    if result is None:
        result = _build(recipe, base, split, seed, source, data_dir)
        if path is not None:
            _write_cache(path, meta, result)
    _MEMORY_CACHE[key] = result
    return result


def clear_memory_cache() -> None:
    """Forgets the composites cached in memory by this process."""
    _MEMORY_CACHE.clear()


def multi_mnist(
    split: str = "train",
    recipe: str = "sener",
    base: str = "mnist",
    seed: int = 0,
    batch_size: int | None = 256,
    shuffle: bool | None = None,
    source: str = "auto",
    data_dir: str | None = None,
    cache_dir: str | None = None,
    shuffle_seed: int | None = None,
):
    """MultiMNIST / MultiFashion / Multi-(Fashion+MNIST) as a `tf.data` pipeline.

    Yields `(image, {"left": y1, "right": y2})`: `image` float32 `[28, 28, 1]`
    normalised with mean 0.1307 and std 0.3081 (`sener`) or `[36, 36, 1]` in
    [0, 1] (`pareto`); labels int64 class ids of the top-left and bottom-right
    objects. The construction of both recipes, with its sources, is described
    in the module docstring; the arrays come from `multi_mnist_arrays` (cached
    in memory and on disk), so later epochs cost no generation.

    Args:
        split: `"train"` or `"test"`, optionally sliced (`"train[:1000]"`).
        recipe: `"sener"` or `"pareto"`.
        base: `"mnist"`, `"fashion"` or `"fashion+mnist"`.
        seed: seed of the pairing, the shifts and the shuffling.
        batch_size: examples per batch; `None` yields unbatched examples.
        shuffle: reshuffle every epoch. Default: `True` for the train split.
        source: `"auto"`, `"local"` or `"tfds"` (see `kmtl.data.load_arrays`).
        data_dir: data root (default `$KMTL_DATA_DIR`).
        cache_dir: `.npz` cache directory (see `multi_mnist_arrays`).
        shuffle_seed: seed of the order of examples; default `seed`. Give it
            to keep the composites (drawn from `seed`) and vary the order.

    Returns:
        A `tf.data.Dataset`.

    Raises:
        ValueError: unknown `split`, `recipe` or `base`, or a bad `batch_size`.
        FileNotFoundError: the source files are missing.

    Example:

    >>> train = kmtl.data.multi_mnist("train", recipe="sener", batch_size=256)
    >>> image, labels = next(iter(train))
    >>> image.shape, sorted(labels)
    (TensorShape([256, 28, 28, 1]), ['left', 'right'])

    References:
        Sener, O. and Koltun, V. "Multi-Task Learning as Multi-Objective
        Optimization." NeurIPS 2018.
        Lin, X. et al. "Pareto Multi-Task Learning." NeurIPS 2019.
    """
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
    ):
        raise ValueError(
            f"`batch_size` must be a positive integer or None. Received: batch_size={batch_size!r}"
        )
    if shuffle_seed is None:
        shuffle_seed = seed
    elif (
        isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, (int, np.integer)) or shuffle_seed < 0
    ):
        raise ValueError(
            f"`shuffle_seed` must be a non-negative integer or None. Received: shuffle_seed={shuffle_seed!r}"
        )
    arrays = multi_mnist_arrays(split, recipe, base, seed, source, data_dir, cache_dir)
    import tensorflow as tf

    if shuffle is None:
        shuffle = split.startswith("train")
    if recipe == "sener":
        scale, shift = 1.0 / (255.0 * SENER_STD), -SENER_MEAN / SENER_STD
    else:
        scale, shift = 1.0 / 255.0, 0.0

    images = tf.constant(arrays.images[..., None])
    left = tf.constant(arrays.labels["left"])
    right = tf.constant(arrays.labels["right"])
    count = len(arrays.images)

    def gather(index):
        image = tf.cast(tf.gather(images, index), tf.float32) * scale + shift
        return image, {"left": tf.gather(left, index), "right": tf.gather(right, index)}

    def epoch_order(epoch_seed):
        # A fresh permutation per epoch: `Dataset.random` below draws a new
        # seed each time the dataset is iterated, deterministically from `seed`.
        order = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64),
            seed=tf.stack([epoch_seed, tf.constant(int(shuffle_seed), tf.int64)]),
        )
        return tf.data.Dataset.from_tensor_slices(order)

    if shuffle:
        seeds = tf.data.Dataset.random(seed=int(shuffle_seed), rerandomize_each_iteration=True).take(1)
        dataset = seeds.flat_map(epoch_order)
    else:
        dataset = tf.data.Dataset.range(count)
    num_examples = count
    if batch_size is not None:
        dataset = dataset.batch(int(batch_size))
        num_examples = -(-count // int(batch_size))
    dataset = dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_examples))
    return dataset.prefetch(tf.data.AUTOTUNE)


def multi_mnist_stream(
    split, base, batch_size, drop_remainder, shuffle, shuffle_seed, source, data_dir, epochs, skip_batches
):
    """The Sener-recipe composites (pairing seed 0) as a stream of epochs (see `kmtl.data._order`)."""
    import tensorflow as tf

    from kmtl.data import _order

    arrays = multi_mnist_arrays(split, "sener", base, 0, source, data_dir, None)
    scale, shift = 1.0 / (255.0 * SENER_STD), -SENER_MEAN / SENER_STD
    images = tf.constant(arrays.images[..., None])
    left = tf.constant(arrays.labels["left"])
    right = tf.constant(arrays.labels["right"])

    def gather(index):
        image = tf.cast(tf.gather(images, index), tf.float32) * scale + shift
        return image, {"left": tf.gather(left, index), "right": tf.gather(right, index)}

    batches = _order.index_batches(
        len(arrays.images), batch_size, drop_remainder, shuffle, shuffle_seed, epochs, skip_batches
    )
    return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
