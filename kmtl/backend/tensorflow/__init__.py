"""TensorFlow implementation of kmtl's training engine (see `kmtl.backend`).

* `distribute`: replica counts and sums, the guarded optimizer update.
* `checks`: in-graph label checks and the translation of their errors.
* `step`: the train and test steps.
* `gram`: the layer-by-layer Gram engine of the parameters mode.
"""

from kmtl.backend.tensorflow.checks import check_label_range, translate_errors
from kmtl.backend.tensorflow.distribute import num_replicas, sum_over_replicas
from kmtl.backend.tensorflow.step import shared_task_gradients, test_step, train_step

__all__ = [
    "check_label_range",
    "num_replicas",
    "shared_task_gradients",
    "sum_over_replicas",
    "test_step",
    "train_step",
    "translate_errors",
]
