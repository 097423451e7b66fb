"""The tasks derived from each labelled image set, their heads and class names.

Every task is a function of the image's label, so one image set feeds
several heads at once:

| dataset                  | task        | head           | target                                      |
|--------------------------|-------------|----------------|---------------------------------------------|
| `mnist`, `digits`        | `digit`     | Classification(10) | int32 digit 0..9                        |
|                          | `parity`    | Binary         | float32, 1 = odd                            |
|                          | `large`     | Binary         | float32, 1 = digit >= 5                     |
|                          | `value`     | Regression     | float32 digit value                         |
| `fashion_mnist`          | `item`      | Classification(10) | int32 class (`FASHION_MNIST_CLASSES`)   |
|                          | `group`     | Classification(5)  | int32 coarse group (`FASHION_MNIST_GROUPS`) |
| `emnist/balanced`, `emnist/bymerge`, `emnist/byclass` | `char` | Classification(47/47/62) | int32 class (`kmtl.data.emnist.emnist_char_names`) |
|                          | `is_letter` | Binary         | float32, 1 = letter, 0 = digit              |
|                          | `case`      | Binary         | float32, 1 = lower case (masked where undefined) |
| `emnist/letters`         | `char`      | Classification(26) | int32 letter, A = 0 (stored labels 1..26 minus 1) |
| `emnist/digits`, `emnist/mnist` | `char`, `parity`, `large`, `value` | as for `mnist` |     |
| `multimnist`, `multifashion`, `multi_fashion_mnist` | `left`, `right` | Classification(10) each | int64 class of the top-left / bottom-right object |
| `movielens`, `movielens/temporal` | `rating` | Regression | float32 rating 1..5 (masked on sampled negatives) |
|                          | `liked`     | Binary         | float32, 1 = rating >= 4 (masked on negatives) |
|                          | `watched`   | Binary         | float32, 1 = rated, 0 = sampled negative    |
|                          | `liked_given_watched` | Binary | liked, masked on negatives (ESMM's pCVR) |
|                          | `watched_and_liked` | Binary   | float32, 1 = rated and liked (ESMM's pCTCVR) |

The MovieLens datasets (`RECOMMENDER_DATASETS`) are `kmtl.data.movielens_tasks`
with raw feature inputs (see `kmtl.data.movielens_features`), split seed 0
and 4 negatives per rating: `movielens` the seeded random 80/20 split,
`movielens/temporal` each user's latest 20 % of ratings as test.

The three composite datasets (`COMPOSITE_DATASETS`) are the Sener & Koltun
(2018) recipe of `kmtl.data.multi_mnist` on MNIST, Fashion-MNIST and
Fashion (left) + MNIST (right): 28x28 images normalised with the MNIST
statistics, one composite per source image, the pairing drawn with seed 0
for every split, so every run sees the same composites. Their heads are
MultiLeNet's (Dense 50 + ReLU, dropout 0.5, then the 10 classes).

Fashion-MNIST groups: `top` = {T-shirt/top, Pullover, Coat, Shirt},
`bottom` = {Trouser}, `dress` = {Dress}, `footwear` = {Sandal, Sneaker,
Ankle boot}, `bag` = {Bag}.

EMNIST `case` is defined only for classes holding a single case (all
letters of `byclass`; in `bymerge`/`balanced` the 11 letters with separate
upper- and lower-case classes, both cases). When `case` is requested the
pipeline yields `(image, {task: y}, {task: weight})` with a weight for every
requested task: 1.0 where the label is defined, 0.0 for `case` on digits and
merged-case letters (whose `case` target is a placeholder 0). Use the
heads' `mean_with_sample_weight` reduction so masked examples add no loss.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from kmtl.data import emnist as _emnist
from kmtl.data._checks import check_task_names
from kmtl.data.sources import BASE_SOURCES, COMPOSITE_DATASETS, _check_dataset

#: Recommender datasets: name -> `kmtl.data.movielens_tasks` split scheme.
RECOMMENDER_DATASETS = {"movielens": "random", "movielens/temporal": "temporal"}
_MOVIELENS_REGRESSION = ("rating",)

__all__ = [
    "COMPOSITE_DATASETS",
    "RECOMMENDER_DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_GROUPS",
    "FASHION_MNIST_GROUP_OF_CLASS",
    "available_tasks",
    "class_names",
    "input_shape",
    "task_heads",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_GROUPS = ("top", "bottom", "dress", "footwear", "bag")
FASHION_MNIST_GROUP_OF_CLASS = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)  # class index -> group index


class _Task(NamedTuple):
    kind: str  # "classification", "binary" or "regression"
    num_classes: int | None
    derive: object  # labels (int64 [N]) -> (target [N], weight [N] or None); None: composite labels


def _digit_tasks(name: str) -> dict[str, _Task]:
    return {
        name: _Task("classification", 10, lambda y: (y.astype(np.int32), None)),
        "parity": _Task("binary", None, lambda y: ((y % 2).astype(np.float32), None)),
        "large": _Task("binary", None, lambda y: ((y >= 5).astype(np.float32), None)),
        "value": _Task("regression", None, lambda y: (y.astype(np.float32), None)),
    }


def _emnist_task(split_name: str, key: str, weighted: bool = False):
    def derive(labels):
        derived = _emnist.emnist_derived_labels(split_name, labels)
        return derived[key], (derived["case_weight"] if weighted else None)

    return derive


def _tasks_of(dataset: str) -> dict[str, _Task]:
    if dataset in COMPOSITE_DATASETS:
        return {side: _Task("classification", 10, None) for side in ("left", "right")}
    if dataset in RECOMMENDER_DATASETS:
        from kmtl.data.movielens import TASKS

        return {
            task: _Task("regression" if task in _MOVIELENS_REGRESSION else "binary", None, None)
            for task in TASKS
        }
    _check_dataset(dataset)
    if dataset in ("mnist", "digits"):
        return _digit_tasks("digit")
    if dataset == "fashion_mnist":
        groups = np.asarray(FASHION_MNIST_GROUP_OF_CLASS, np.int32)
        return {
            "item": _Task("classification", 10, lambda y: (y.astype(np.int32), None)),
            "group": _Task("classification", len(FASHION_MNIST_GROUPS), lambda y: (groups[y], None)),
        }
    split_name = dataset.split("/", 1)[1]
    num_classes, _ = _emnist.EMNIST_SPLITS[split_name]
    char = _Task("classification", num_classes, _emnist_task(split_name, "char"))
    if split_name in ("digits", "mnist"):
        return {"char": char, **{k: v for k, v in _digit_tasks("char").items() if k != "char"}}
    if split_name == "letters":
        return {"char": char}
    return {
        "char": char,
        "is_letter": _Task("binary", None, _emnist_task(split_name, "is_letter")),
        "case": _Task("binary", None, _emnist_task(split_name, "case", weighted=True)),
    }


def available_tasks(dataset: str) -> list[str]:
    """Returns the task names `task_dataset` derives for `dataset`.

    >>> kmtl.data.available_tasks("mnist")
    ['digit', 'parity', 'large', 'value']
    """
    return list(_tasks_of(dataset))


def input_shape(dataset: str) -> tuple[int, int, int]:
    """Returns the image shape a pipeline yields: `(8, 8, 1)` for digits, else `(28, 28, 1)`.

    Raises:
        ValueError: for a recommender dataset, whose inputs are raw features
            (`kmtl.data.movielens_features`), not one image.
    """
    if dataset in RECOMMENDER_DATASETS:
        raise ValueError(
            f"Dataset {dataset!r} has raw feature inputs, not images: build its model with "
            f"`features=kmtl.data.movielens_features(...)`. Received: dataset={dataset!r}"
        )
    if dataset in COMPOSITE_DATASETS:
        return (28, 28, 1)
    return (8, 8, 1) if _check_dataset(dataset) == "digits" else (28, 28, 1)


def class_names(dataset: str, task: str) -> list[str]:
    """Returns the class names of a classification task, index = class.

    Raises:
        ValueError: if the task is unknown or not a classification task.

    >>> kmtl.data.class_names("fashion_mnist", "group")
    ['top', 'bottom', 'dress', 'footwear', 'bag']
    """
    spec = _check_tasks(dataset, [task])[task]
    if spec.kind != "classification":
        raise ValueError(
            f"Task {task!r} of {dataset!r} has no classes; it is a {spec.kind} task. Received: task={task!r}"
        )
    if dataset == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES if task == "item" else FASHION_MNIST_GROUPS)
    if dataset in COMPOSITE_DATASETS:
        left, right = BASE_SOURCES[COMPOSITE_DATASETS[dataset]]
        source = left if task == "left" else right
        return class_names(source, "item" if source == "fashion_mnist" else "digit")
    if dataset.startswith("emnist/"):
        return _emnist.emnist_char_names(dataset.split("/", 1)[1])
    return [str(digit) for digit in range(10)]


def _check_tasks(dataset: str, tasks) -> dict[str, _Task]:
    available = _tasks_of(dataset)
    return {task: available[task] for task in check_task_names(tasks, available, f"dataset {dataset!r}")}


def task_heads(dataset: str, tasks: Sequence[str]) -> list:
    """Returns one `kmtl.heads` head per task, in order, sized for `dataset`.

    Args:
        dataset: a dataset name of `kmtl.data.load_arrays`.
        tasks: task names from `available_tasks(dataset)`.

    Returns:
        A list of `kmtl.heads.Classification`, `Binary` or `Regression`.

    Raises:
        ValueError: for unknown or duplicate task names.

    >>> [head.name for head in kmtl.data.task_heads("mnist", ["digit", "parity"])]
    ['digit', 'parity']
    """
    from kmtl import heads  # imported here: kmtl.heads imports Keras

    specs = _check_tasks(dataset, tasks)
    built = []
    for name, spec in specs.items():
        if spec.kind == "classification" and dataset in COMPOSITE_DATASETS:
            # MultiLeNet's task heads (Sener & Koltun): Dense 50 + ReLU, dropout 0.5, then the classes.
            built.append(
                heads.Classification(name, num_classes=spec.num_classes, hidden_units=(50,), dropout=0.5)
            )
        elif spec.kind == "classification":
            built.append(heads.Classification(name, num_classes=spec.num_classes))
        elif spec.kind == "binary":
            built.append(heads.Binary(name))
        else:
            built.append(heads.Regression(name))
    return built
