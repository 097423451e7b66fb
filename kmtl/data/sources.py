"""Labelled image sets as NumPy arrays: local IDX files, tfds, scikit-learn digits.

`load_arrays(dataset, split, source, data_dir)` returns `(images, labels)`
with images `uint8 [N, H, W]` (0 = background) and labels `int64 [N]`.

Datasets: `"mnist"`, `"fashion_mnist"`, `"digits"` (scikit-learn's bundled
8x8 handwritten digits) and `"emnist/<split_name>"` for the EMNIST splits
`balanced`, `byclass`, `bymerge`, `digits`, `letters`, `mnist` (see
`kmtl.data.emnist`).

Sources:

- `"local"`: the official IDX `.gz` files (an uncompressed copy without the
  `.gz` suffix is accepted too) under the data directory
  (`kmtl.data.data_dir`): `mnist/train-images-idx3-ubyte.gz`,
  `mnist/train-labels-idx1-ubyte.gz`, `mnist/t10k-images-idx3-ubyte.gz`,
  `mnist/t10k-labels-idx1-ubyte.gz`; the same names under `fashion-mnist/`;
  `emnist/emnist-<split_name>-{train,test}-{images-idx3,labels-idx1}-ubyte.gz`.
- `"tfds"`: `tensorflow_datasets.load` (`mnist`, `fashion_mnist`,
  `emnist/<split_name>`), downloading and preparing the data if needed.
  `tfds_data_dir` (default: tfds's own, `$TFDS_DATA_DIR` or
  `~/tensorflow_datasets`) says where tfds keeps it.
- `"auto"`: local files when both files of the split are present (a
  directory under a file's name counts, and is reported as such); otherwise
  tfds, but only if the dataset is already prepared in the tfds data
  directory (no download is attempted, so `auto` fails fast when offline);
  otherwise `FileNotFoundError` saying what was looked for and where.

`"digits"` ignores `source`: it is bundled with scikit-learn and always
offline. Its 1,797 images (values 0..16) are scaled to 0..255 and split
deterministically into train/test: per class, a permutation drawn with
`numpy.random.default_rng(0)` puts the first 20% (rounded) in `test` and
the rest in `train` (1,438 train and 359 test images, stratified).

Splits are `"train"` or `"test"`, optionally sliced tfds-style:
`"train[:1000]"`, `"train[10%:]"`, `"test[-500:]"`. Percent boundaries
round to the closest example as in tfds. For the tfds source the split is
passed to tfds unchanged.

Loaded arrays are cached in this process (see `clear_cache`) and returned
read-only, so repeated pipelines do not read the files again.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from kmtl.data import emnist as _emnist
from kmtl.data.idx import IDXError, read_idx

__all__ = ["DATASETS", "SOURCES", "available", "clear_cache", "data_dir", "load_arrays", "parse_split"]

DATASETS = ("mnist", "fashion_mnist", "digits") + tuple(
    f"emnist/{name}" for name in sorted(_emnist.EMNIST_SPLITS)
)
SOURCES = ("auto", "local", "tfds")
#: Two-object datasets of `task_dataset` and the `kmtl.data.multi_mnist` base each uses
#: (Sener & Koltun's recipe): MultiMNIST, MultiFashion and Multi-(Fashion+MNIST).
COMPOSITE_DATASETS = {
    "multimnist": "mnist",
    "multifashion": "fashion",
    "multi_fashion_mnist": "fashion+mnist",
}
#: The datasets of the (left, right) objects of each `kmtl.data.multi_mnist` base.
BASE_SOURCES = {
    "mnist": ("mnist", "mnist"),
    "fashion": ("fashion_mnist", "fashion_mnist"),
    "fashion+mnist": ("fashion_mnist", "mnist"),
}
SPLITS = ("train", "test")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SEED = 0
_SPLIT_PATTERN = re.compile(r"^(train|test)(?:\[([^\[\]]*)\])?$")
_BOUND_PATTERN = re.compile(r"^\s*(-?\d+)\s*(%?)\s*$")
_FOLDERS = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "digits": 10}
_HOMEPAGES = {
    "mnist": "https://yann.lecun.com/exdb/mnist/",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
    "emnist": "https://www.nist.gov/itl/products-and-services/emnist-dataset (gzip.zip, folder gzip/)",
}


def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Returns the root folder of the local dataset files.

    Order: the `data_dir` argument, else the `KMTL_DATA_DIR` environment
    variable (when set and not empty), else `~/.kmtl/data`. `~` is expanded.

    Args:
        data_dir: explicit folder, or `None`.

    Returns:
        The folder as a `pathlib.Path` (it need not exist).

    Example:

    >>> kmtl.data.data_dir("/data")
    PosixPath('/data')
    """
    if data_dir is None:
        data_dir = os.environ.get("KMTL_DATA_DIR") or os.path.join("~", ".kmtl", "data")
    return Path(os.path.expanduser(os.fspath(data_dir)))


_resolve_data_dir = data_dir  # `load_arrays` has an argument of the same name


def _check_dataset(dataset) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset; expected one of {list(DATASETS)}. Received: dataset={dataset!r}")
    return dataset


def parse_split(split) -> tuple[str, slice | None]:
    """Parses `"train"`, `"test"` or a tfds-style slice such as `"train[:10%]"`.

    Args:
        split: the split string.

    Returns:
        `(base, bounds)` with `base` in `("train", "test")` and `bounds`
        `None` or a `slice` whose start/stop are `int` examples or `str`
        percentages (e.g. `"10%"`), resolved by `_slice_bounds`.

    Raises:
        ValueError: for anything else, listing the accepted forms.
    """
    match = _SPLIT_PATTERN.match(split) if isinstance(split, str) else None
    error = ValueError(
        f"Unknown split; expected 'train' or 'test', optionally sliced as in tfds: "
        f"'train[:1000]', 'train[10%:]', 'test[-500:]'. Received: split={split!r}"
    )
    if match is None:
        raise error
    base, inner = match.groups()
    if inner is None:
        return base, None
    parts = inner.split(":")
    if len(parts) != 2:
        raise error
    bounds = []
    for part in parts:
        if not part.strip():
            bounds.append(None)
            continue
        bound = _BOUND_PATTERN.match(part)
        if bound is None:
            raise error
        value, percent = int(bound.group(1)), bound.group(2)
        if percent and not -100 <= value <= 100:
            raise ValueError(f"Split percentages must lie in -100..100. Received: split={split!r}")
        bounds.append(f"{value}%" if percent else value)
    return base, slice(*bounds)


def _slice_bounds(bounds: slice, num_examples: int) -> slice:
    def resolve(bound):
        if isinstance(bound, str):  # percentage, rounded to the closest example (as tfds)
            return int(round(int(bound[:-1]) * num_examples / 100.0))
        return bound

    return slice(resolve(bounds.start), resolve(bounds.stop))


def _local_files(dataset: str, split: str, root: Path) -> tuple[Path, list[str]]:
    prefix = "train" if split == "train" else "t10k"
    if dataset.startswith("emnist/"):
        name = dataset.split("/", 1)[1]
        folder = root / "emnist"
        names = [f"emnist-{name}-{split}-images-idx3-ubyte.gz", f"emnist-{name}-{split}-labels-idx1-ubyte.gz"]
    else:
        folder = root / _FOLDERS[dataset]
        names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    return folder, names


def _find_local(dataset: str, split: str, root: Path) -> list[Path] | None:
    folder, names = _local_files(dataset, split, root)
    found = []
    for name in names:
        candidates = [folder / name, folder / name[: -len(".gz")]]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            # A directory under the file's name is taken, so that `read_idx` reports it as a
            # directory (IsADirectoryError) instead of the file being called missing.
            path = next((candidate for candidate in candidates if candidate.is_dir()), None)
        if path is None:
            return None
        found.append(path)
    return found


def _missing_files_error(dataset: str, split: str, root: Path, explicit: bool, tfds_note: str = ""):
    folder, names = _local_files(dataset, split, root)
    origin = (
        "the data_dir argument"
        if explicit
        else ("$KMTL_DATA_DIR" if os.environ.get("KMTL_DATA_DIR") else "the default, ~/.kmtl/data")
    )
    return FileNotFoundError(
        f"No local {dataset!r} {split!r} files: looked for {', '.join(names)} in {str(folder)!r} "
        f"(data directory from {origin}).{tfds_note} To get the data, either set KMTL_DATA_DIR "
        f"(or pass data_dir) to a folder holding {folder.name}/ with the official files under their "
        f"original names (from {_HOMEPAGES[dataset.split('/')[0]]}), or use source='tfds' to "
        f"download and prepare it with tensorflow-datasets, or use dataset='digits' (bundled, offline)."
    )


def _read_local(dataset: str, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IDXError(
            f"IDX file {str(files[0])!r} should hold uint8 images [N, H, W]. "
            f"Received: dtype={images.dtype}, shape={images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IDXError(
            f"IDX file {str(files[1])!r} should hold uint8 labels [N]. "
            f"Received: dtype={labels.dtype}, shape={labels.shape}"
        )
    if len(images) != len(labels):
        raise IDXError(
            f"IDX files {str(files[0])!r} and {str(files[1])!r} disagree on the number of "
            f"examples. Received: {len(images)} images and {len(labels)} labels"
        )
    return images, labels


def _tfds_prepared(dataset: str, tfds_data_dir) -> bool:
    try:
        import tensorflow_datasets as tfds

        return bool(tfds.builder(dataset, data_dir=tfds_data_dir).is_prepared())
    except Exception:  # noqa: BLE001 - an unusable tfds install means "not prepared"
        return False


def _read_tfds(dataset: str, split: str, tfds_data_dir):
    import tensorflow_datasets as tfds

    # The kmtl dataset names are the tfds names (`mnist`, `fashion_mnist`, `emnist/balanced`).
    ds = tfds.load(dataset, split=split, as_supervised=True, data_dir=tfds_data_dir, download=True)
    images, labels = [], []
    for image_batch, label_batch in tfds.as_numpy(ds.batch(8192)):
        images.append(image_batch)
        labels.append(label_batch)
    if not images:
        return np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.int64)
    images = np.concatenate(images)
    return images.reshape(images.shape[:3]).astype(np.uint8, copy=False), np.concatenate(labels)


def _read_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(_DIGITS_SEED)
    test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[: int(round(_DIGITS_TEST_FRACTION * len(members)))]] = True
    return {"train": (images[~test], labels[~test]), "test": (images[test], labels[test])}


def _finish(dataset: str, images, labels, origin: str):
    """Checks labels, makes EMNIST upright, returns read-only arrays."""
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64)
    if dataset.startswith("emnist/"):
        split_name = dataset.split("/", 1)[1]
        num_classes, low = _emnist.EMNIST_SPLITS[split_name]
        images = np.ascontiguousarray(images.transpose(0, 2, 1))  # stored transposed
    else:
        num_classes, low = _NUM_CLASSES[dataset], 0
    if labels.size and (labels.min() < low or labels.max() > low + num_classes - 1):
        raise ValueError(
            f"{dataset!r} labels from {origin} must lie in {low}..{low + num_classes - 1}. "
            f"Received: labels in {labels.min()}..{labels.max()}"
        )
    for array in (images, labels):
        array.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=12)
def _load_cached(dataset: str, split: str, source: str, location: str, tfds_key):
    if dataset == "digits":
        images, labels = _read_digits()[split]
        return _finish(dataset, images, labels, "scikit-learn load_digits")
    if source == "local":
        files = _find_local(dataset, split, Path(location))
        images, labels = _read_local(dataset, files)
        return _finish(dataset, images, labels, f"{str(files[1])!r}")
    tfds_data_dir, _ = tfds_key
    images, labels = _read_tfds(dataset, split, tfds_data_dir)
    return _finish(dataset, images, labels, f"tfds {dataset!r} split {split!r}")


def available(dataset: str, data_dir: str | os.PathLike | None = None, tfds_data_dir=None) -> bool:
    """Whether `load_arrays(dataset, source="auto")` would find the data without downloading.

    True for `"digits"` (bundled), for local files present under the data
    directory (both splits), or for a dataset tfds has already prepared; a
    composite dataset (`"multimnist"`, ...) when each of its bases is.
    Nothing is read or downloaded.

    Example:

    >>> kmtl.data.available("digits")
    True
    """
    if dataset in COMPOSITE_DATASETS:
        sources = set(BASE_SOURCES[COMPOSITE_DATASETS[dataset]])
        return all(available(source, data_dir, tfds_data_dir) for source in sources)
    _check_dataset(dataset)
    if dataset == "digits":
        return True
    root = _resolve_data_dir(data_dir)
    if all(_find_local(dataset, split, root) is not None for split in SPLITS):
        return True
    return _tfds_prepared(dataset, tfds_data_dir)


def clear_cache() -> None:
    """Forgets the arrays `load_arrays` keeps in memory (e.g. after files changed)."""
    _load_cached.cache_clear()


def load_arrays(
    dataset: str,
    split: str = "train",
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    *,
    tfds_data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a labelled image set as NumPy arrays.

    See the module docstring for datasets, sources, file names and splits.

    Args:
        dataset: `"mnist"`, `"fashion_mnist"`, `"digits"` or
            `"emnist/<split_name>"`.
        split: `"train"` or `"test"`, optionally sliced (`"train[:1000]"`).
        source: `"auto"`, `"local"` or `"tfds"`; ignored for `"digits"`.
        data_dir: root of the local files; default `kmtl.data.data_dir()`.
        tfds_data_dir: where tfds keeps prepared datasets; default tfds's.

    Returns:
        `(images, labels)`: read-only `uint8 [N, H, W]` images (EMNIST
        upright) and `int64 [N]` labels as stored (EMNIST `letters`: 1..26).

    Raises:
        ValueError: for an unknown dataset, split or source, or labels out
            of the dataset's range.
        FileNotFoundError: when the local files are missing (and, for
            `"auto"`, tfds has not prepared the dataset); the message says
            which files were looked for, where, and how to get them.
        IsADirectoryError: when a directory stands where a local file
            should be (for `"auto"` too); the message names it.
        kmtl.data.IDXError: for corrupt, truncated or malformed files
            (including a gzip file that inflates past its declared size).

    Example:

    >>> images, labels = kmtl.data.load_arrays("mnist", "test[:100]", source="local")
    >>> images.shape, labels.dtype
    ((100, 28, 28), dtype('int64'))
    """
    _check_dataset(dataset)
    if source not in SOURCES:
        raise ValueError(f"Unknown source; expected one of {list(SOURCES)}. Received: source={source!r}")
    base, bounds = parse_split(split)
    root = _resolve_data_dir(data_dir)
    if dataset == "digits":
        images, labels = _load_cached(dataset, base, "digits", "", None)
    else:
        if source == "auto":
            if _find_local(dataset, base, root) is not None:
                source = "local"
            elif _tfds_prepared(dataset, tfds_data_dir):
                source = "tfds"
            else:
                tfds_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
                note = f" tfds has not prepared it either in {os.fspath(tfds_dir)!r}."
                raise _missing_files_error(dataset, base, root, data_dir is not None, note)
        if source == "local":
            if _find_local(dataset, base, root) is None:
                raise _missing_files_error(dataset, base, root, data_dir is not None)
            images, labels = _load_cached(dataset, base, "local", str(root.resolve()), None)
        else:
            import tensorflow_datasets as tfds

            # The tfds key holds `DatasetBuilder.as_dataset` itself: a `tfds.testing.mock_data`
            # context patches it with a new function, so mocked data is never served later.
            tfds_key = (
                None if tfds_data_dir is None else os.fspath(tfds_data_dir),
                tfds.core.DatasetBuilder.as_dataset,
            )
            return _load_cached(dataset, split, "tfds", "", tfds_key)
    if bounds is not None:
        window = _slice_bounds(bounds, len(labels))
        images, labels = images[window], labels[window]
    return images, labels
