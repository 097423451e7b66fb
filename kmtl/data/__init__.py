"""Datasets for multi-task learning: IDX files, sources and task pipelines.

- `read_idx` / `write_idx`: the IDX format of MNIST, Fashion-MNIST, EMNIST.
- `load_arrays(dataset, split, source, data_dir)`: `uint8` images and
  `int64` labels from local files, tfds or scikit-learn's bundled digits.
- `mnist_tasks`, `fashion_tasks`, `digits_tasks`, `emnist_tasks` and the
  generic `task_dataset`: `tf.data` pipelines yielding
  `(image, {task: label})` with labels derived from one image set.
- `task_heads`, `available_tasks`, `input_shape`, `class_names`: what a
  model for those pipelines needs.
- `multi_mnist` / `multi_mnist_arrays`: MultiMNIST, MultiFashion and
  Multi-(Fashion+MNIST), two objects per image (module `kmtl.data.recipes`).
- `mix({task: dataset})`: single-task datasets mixed into masked
  multi-task batches.
- `load_movielens`, `movielens_arrays`, `movielens_tasks`, `movielens_features`:
  MovieLens 100K tasks and the feature spec of their raw columns.
- `synthetic_tasks` / `synthetic_task_dataset`: regression tasks of a set
  relatedness (Ma et al. 2018), with `expected_label_correlation` and
  `label_correlation` (module `kmtl.data.synthetic`).

Example:

>>> import kmtl
>>> train = kmtl.data.mnist_tasks(["digit", "parity"], split="train", batch_size=128)
>>> heads = kmtl.data.task_heads("mnist", ["digit", "parity"])
"""

from kmtl.data import emnist, recipes
from kmtl.data.idx import IDXError, read_idx, write_idx
from kmtl.data.mixing import mix
from kmtl.data.movielens import (
    load_movielens,
    movielens_arrays,
    movielens_available,
    movielens_features,
    movielens_tasks,
)
from kmtl.data.recipes import multi_mnist, multi_mnist_arrays
from kmtl.data.sources import DATASETS, SOURCES, available, clear_cache, data_dir, load_arrays, parse_split
from kmtl.data.synthetic import (
    expected_label_correlation,
    label_correlation,
    synthetic_heads,
    synthetic_task_dataset,
    synthetic_task_names,
    synthetic_tasks,
)
from kmtl.data.task_specs import (
    COMPOSITE_DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_GROUP_OF_CLASS,
    FASHION_MNIST_GROUPS,
    RECOMMENDER_DATASETS,
    available_tasks,
    class_names,
    input_shape,
    task_heads,
)
from kmtl.data.tasks import digits_tasks, emnist_tasks, fashion_tasks, mnist_tasks, task_dataset

__all__ = [
    "COMPOSITE_DATASETS",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_GROUPS",
    "FASHION_MNIST_GROUP_OF_CLASS",
    "IDXError",
    "RECOMMENDER_DATASETS",
    "SOURCES",
    "available",
    "available_tasks",
    "class_names",
    "clear_cache",
    "data_dir",
    "digits_tasks",
    "emnist",
    "emnist_tasks",
    "expected_label_correlation",
    "fashion_tasks",
    "input_shape",
    "label_correlation",
    "load_arrays",
    "load_movielens",
    "mix",
    "mnist_tasks",
    "movielens_arrays",
    "movielens_available",
    "movielens_features",
    "movielens_tasks",
    "multi_mnist",
    "multi_mnist_arrays",
    "parse_split",
    "read_idx",
    "recipes",
    "synthetic_heads",
    "synthetic_task_dataset",
    "synthetic_task_names",
    "synthetic_tasks",
    "task_dataset",
    "task_heads",
    "write_idx",
]
