"""The training engine's backend: the only code that knows which framework runs the step.

kmtl runs on Keras 3 with TensorFlow. Everything TensorFlow-specific in the
training engine lives in `kmtl.backend.tensorflow`: the train and test steps
(loss-level, parameters, representation and Gram paths), the distribution
helpers (replica sums, the global masked mean, the guarded optimizer update)
and in-graph label checks. The model, the objective and the strategies call
only the functions re-exported here, so a step for another backend can be
added beside it without touching them.

Boundary: the model owns the graph and which variables are shared; the
objective (`kmtl.objective`) owns what each task's loss is and how it is
checked, reduced and tracked; a strategy (`kmtl.weighting`) owns only its
math and state; the step is a function of those public objects and the
optimizer.
"""

from kmtl.backend.tensorflow import (
    check_label_range,
    num_replicas,
    shared_task_gradients,
    sum_over_replicas,
    test_step,
    train_step,
    translate_errors,
)

__all__ = [
    "check_label_range",
    "num_replicas",
    "shared_task_gradients",
    "sum_over_replicas",
    "test_step",
    "train_step",
    "translate_errors",
]
