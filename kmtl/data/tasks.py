"""Multi-task `tf.data` pipelines derived from one labelled image set.

The tasks of each dataset (`digit`, `parity`, `item`, `group`, `char`,
`case`, ...) are defined in `kmtl.data.task_specs`.

Pipelines: images `float32 [H, W, 1]` in [0, 1] (the uint8 images are
gathered per batch and normalised in graph), labels keyed by task name in
the requested order. The arrays stay in memory (`kmtl.data.load_arrays`
caches them), so no `cache()` stage is needed; the training split is
reshuffled every epoch from `seed` (the same seed gives the same sequence of
epochs), then batched and prefetched with `AUTOTUNE`.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from kmtl.data import _order
from kmtl.data import emnist as _emnist
from kmtl.data._checks import check_batch_size as _check_batch_size
from kmtl.data.movielens import movielens_tasks
from kmtl.data.sources import load_arrays, parse_split
from kmtl.data.task_specs import COMPOSITE_DATASETS, RECOMMENDER_DATASETS, _check_tasks

__all__ = ["digits_tasks", "emnist_tasks", "fashion_tasks", "mnist_tasks", "task_dataset"]

_UNBATCHED_BLOCK = 1024


def task_dataset(
    dataset: str,
    tasks: Sequence[str],
    split: str = "train",
    batch_size: int | None = 128,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    shuffle: bool | None = None,
    seed: int | None = 0,
    drop_remainder: bool = False,
    tfds_data_dir: str | os.PathLike | None = None,
    *,
    epochs: tuple[int, int] | None = None,
    skip_batches: int = 0,
):
    """Builds a `tf.data.Dataset` of images and derived task labels.

    Args:
        dataset: `"mnist"`, `"fashion_mnist"`, `"digits"`, `"emnist/<split_name>"`
            or a composite dataset (`"multimnist"`, `"multifashion"`,
            `"multi_fashion_mnist"`: `kmtl.data.multi_mnist` with the Sener
            recipe, pairing seed 0, tasks `left` and `right`), or a
            recommender dataset (`"movielens"`, `"movielens/temporal"`:
            `kmtl.data.movielens_tasks` with split seed 0 and 4 negatives
            per rating; `seed` only orders the rows; whole splits only).
        tasks: task names (see `available_tasks`); the label dict keeps their order.
        split: `"train"` or `"test"`, optionally sliced (`"train[:5000]"`).
        batch_size: examples per batch, or `None` for unbatched examples
            (e.g. as input of `kmtl.data.mix`).
        source: `"auto"`, `"local"` or `"tfds"` (see `kmtl.data.load_arrays`).
        data_dir: root of the local files (default `kmtl.data.data_dir()`).
        shuffle: shuffle (again every epoch); default `True` for train
            splits, `False` for test splits.
        seed: shuffle seed; the same seed gives the same order of examples
            epoch after epoch. `None` for a nondeterministic order.
        drop_remainder: drop the last partial batch.
        tfds_data_dir: data directory for tfds (default: tfds's own).
        epochs: `(first, stop)`: instead of one epoch per iteration, one
            stream of the batches of epochs `first, ..., stop - 1`, epoch
            `e` in the order `(seed, e)` alone determines (for `fit` with
            `steps_per_epoch`; what resumable training uses). Needs a
            `batch_size` and an integer `seed`; no batch spans two epochs.
            The orders differ from those of the plain (reshuffling) pipeline.
        skip_batches: with `epochs`, start this many batches into epoch
            `first` (the skipped batches are not gathered).

    Returns:
        A dataset of `(image, {task: label})`, or of `(image, {task: label},
        {task: weight})` when a task has undefined labels (EMNIST `case`).
        Images are `float32 [H, W, 1]` in [0, 1] (batched: `[B, H, W, 1]`);
        composite images are normalised as the Sener recipe says.

    Raises:
        ValueError: for unknown datasets, tasks, splits or sources,
            duplicate tasks, or a bad `batch_size`.
        FileNotFoundError: when the data cannot be found (see `load_arrays`).

    Example:

    >>> train = kmtl.data.task_dataset("digits", ["digit", "parity"], batch_size=32)
    >>> images, labels = next(iter(train))
    >>> images.shape, sorted(labels)
    (TensorShape([32, 8, 8, 1]), ['digit', 'parity'])
    """
    import tensorflow as tf

    specs = _check_tasks(dataset, tasks)
    batch_size = _check_batch_size(batch_size)
    base, _ = parse_split(split)
    if shuffle is None:
        shuffle = base == "train"
    span = _order.check(epochs, skip_batches, seed, batch_size)
    stream = {} if span is None else dict(epochs=span, skip_batches=int(skip_batches))
    if dataset in COMPOSITE_DATASETS:
        return _composite(
            dataset, list(specs), split, batch_size, source, data_dir, shuffle, seed, drop_remainder, **stream
        )
    if dataset in RECOMMENDER_DATASETS:
        return _movielens(
            dataset,
            list(specs),
            split,
            batch_size,
            source,
            data_dir,
            tfds_data_dir,
            shuffle,
            seed,
            drop_remainder,
            **stream,
        )
    images, labels = load_arrays(
        dataset, split, source=source, data_dir=data_dir, tfds_data_dir=tfds_data_dir
    )
    targets, weights = {}, {}
    for name, spec in specs.items():
        targets[name], weights[name] = spec.derive(labels)
    weighted = any(weight is not None for weight in weights.values())
    weights = {name: np.ones(len(labels), np.float32) if w is None else w for name, w in weights.items()}

    num_examples = len(labels)
    image_tensor = tf.constant(images)
    target_tensors = {name: tf.constant(value) for name, value in targets.items()}
    weight_tensors = {name: tf.constant(value) for name, value in weights.items()} if weighted else None

    def take(index):
        image = tf.cast(tf.gather(image_tensor, index), tf.float32) * (1.0 / 255.0)
        example = (
            tf.expand_dims(image, -1),
            {name: tf.gather(value, index) for name, value in target_tensors.items()},
        )
        if weight_tensors is not None:
            example += ({name: tf.gather(value, index) for name, value in weight_tensors.items()},)
        return example

    if stream:
        pipeline = _order.index_batches(num_examples, batch_size, drop_remainder, shuffle, seed, **stream)
        return pipeline.map(take, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
            tf.data.AUTOTUNE
        )
    pipeline = tf.data.Dataset.range(num_examples)
    if shuffle and num_examples > 1:
        pipeline = pipeline.shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
    # Gathering whole batches of indices is ~7x faster than one map call per example, so
    # unbatched pipelines gather blocks and split them again.
    block = batch_size if batch_size is not None else _UNBATCHED_BLOCK
    pipeline = pipeline.batch(block, drop_remainder=drop_remainder and batch_size is not None)
    pipeline = pipeline.map(take, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if batch_size is None:  # unbatch loses the cardinality; `kmtl.data.mix` needs it
        pipeline = pipeline.unbatch().apply(tf.data.experimental.assert_cardinality(num_examples))
    return pipeline.prefetch(tf.data.AUTOTUNE)


def _composite(dataset, tasks, split, batch_size, source, data_dir, shuffle, seed, drop_remainder, **stream):
    """A composite dataset's pipeline: the same composites (pairing seed 0), `seed` orders them."""
    import tensorflow as tf

    from kmtl.data.recipes import multi_mnist, multi_mnist_stream

    if stream:
        pipeline = multi_mnist_stream(
            split,
            COMPOSITE_DATASETS[dataset],
            batch_size,
            drop_remainder,
            shuffle,
            seed,
            source,
            data_dir,
            **stream,
        )
        return pipeline.map(lambda image, labels: (image, {task: labels[task] for task in tasks})).prefetch(
            tf.data.AUTOTUNE
        )
    if shuffle and seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    batched = batch_size is not None and not drop_remainder
    pipeline = multi_mnist(
        split,
        recipe="sener",
        base=COMPOSITE_DATASETS[dataset],
        seed=0,
        batch_size=batch_size if batched else None,
        shuffle=shuffle,
        source=source,
        data_dir=data_dir,
        shuffle_seed=seed if shuffle else None,
    )
    pipeline = pipeline.map(lambda image, labels: (image, {task: labels[task] for task in tasks}))
    if batch_size is not None and drop_remainder:
        pipeline = pipeline.batch(batch_size, drop_remainder=True)
    return pipeline.prefetch(tf.data.AUTOTUNE)


def mnist_tasks(
    tasks: Sequence[str],
    split: str = "train",
    batch_size: int | None = 128,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    shuffle: bool | None = None,
    seed: int | None = 0,
    drop_remainder: bool = False,
    tfds_data_dir: str | os.PathLike | None = None,
):
    """MNIST pipeline with tasks `digit`, `parity`, `large`, `value`.

    Arguments, return value and errors as in `task_dataset` (without `dataset`).

    >>> train = kmtl.data.mnist_tasks(["digit", "parity", "value"], split="train", batch_size=128)
    """
    return task_dataset(
        "mnist", tasks, split, batch_size, source, data_dir, shuffle, seed, drop_remainder, tfds_data_dir
    )


def fashion_tasks(
    tasks: Sequence[str],
    split: str = "train",
    batch_size: int | None = 128,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    shuffle: bool | None = None,
    seed: int | None = 0,
    drop_remainder: bool = False,
    tfds_data_dir: str | os.PathLike | None = None,
):
    """Fashion-MNIST pipeline with tasks `item` (10 classes) and `group` (5 coarse groups).

    Groups (`FASHION_MNIST_GROUPS`): `top` = T-shirt/top, Pullover, Coat,
    Shirt; `bottom` = Trouser; `dress` = Dress; `footwear` = Sandal,
    Sneaker, Ankle boot; `bag` = Bag. Arguments as in `task_dataset`.

    >>> train = kmtl.data.fashion_tasks(["item", "group"], split="train[:1000]")
    """
    return task_dataset(
        "fashion_mnist",
        tasks,
        split,
        batch_size,
        source,
        data_dir,
        shuffle,
        seed,
        drop_remainder,
        tfds_data_dir,
    )


def digits_tasks(
    tasks: Sequence[str],
    split: str = "train",
    batch_size: int | None = 128,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    shuffle: bool | None = None,
    seed: int | None = 0,
    drop_remainder: bool = False,
    tfds_data_dir: str | os.PathLike | None = None,
):
    """scikit-learn digits (8x8, bundled, offline) with the MNIST tasks.

    Arguments as in `task_dataset`; `source`, `data_dir` and `tfds_data_dir`
    are ignored (the data ships with scikit-learn).

    >>> train = kmtl.data.digits_tasks(["digit", "large"], batch_size=64)
    """
    return task_dataset(
        "digits", tasks, split, batch_size, source, data_dir, shuffle, seed, drop_remainder, tfds_data_dir
    )


def emnist_tasks(
    tasks: Sequence[str],
    split_name: str = "balanced",
    split: str = "train",
    batch_size: int | None = 128,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    shuffle: bool | None = None,
    seed: int | None = 0,
    drop_remainder: bool = False,
    tfds_data_dir: str | os.PathLike | None = None,
):
    """EMNIST pipeline for one split (`balanced`, `byclass`, `bymerge`, `letters`, `digits`, `mnist`).

    Tasks: `char`; `is_letter` and `case` for `balanced`/`bymerge`/`byclass`;
    `parity`, `large`, `value` for `digits`/`mnist`. With `case`, yields
    `(image, labels, weights)` (see the module docstring). Images are
    upright. Other arguments as in `task_dataset`.

    Raises:
        ValueError: for an unknown `split_name`, and as `task_dataset`.

    >>> train = kmtl.data.emnist_tasks(["char", "is_letter", "case"], split_name="balanced")
    """
    _emnist._check_split_name(split_name)
    return task_dataset(
        f"emnist/{split_name}",
        tasks,
        split,
        batch_size,
        source,
        data_dir,
        shuffle,
        seed,
        drop_remainder,
        tfds_data_dir,
    )


def _movielens(
    dataset,
    tasks,
    split,
    batch_size,
    source,
    data_dir,
    tfds_data_dir,
    shuffle,
    seed,
    drop_remainder,
    **stream,
):
    """A MovieLens pipeline: split seed 0 and 4 negatives for every run, `seed` orders the rows."""
    base, bounds = parse_split(split)
    if bounds is not None:
        raise ValueError(
            f"{dataset} splits are whole (`train` or `test` of its split scheme); a slice would cut the "
            f"sampled negatives from their ratings. Received: split={split!r}"
        )
    return movielens_tasks(
        tasks,
        split=base,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=0,
        shuffle_seed=seed,
        drop_remainder=drop_remainder,
        split_scheme=RECOMMENDER_DATASETS[dataset],
        source=source,
        data_dir=data_dir,
        tfds_data_dir=tfds_data_dir,
        **stream,
    )
