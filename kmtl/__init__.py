"""kmtl: multi-task learning for Keras 3 on TensorFlow.

Importing `kmtl` imports every module, so every kmtl class that a saved model
may name is registered with Keras (loading works in any process that ran
`import kmtl`).

Build a model with named heads on a shared trunk (on images, arrays, or
raw tabular columns described by `kmtl.inputs.Features`), train it with plain
`model.fit` on dict targets, weight or aggregate the tasks with
`kmtl.weighting`, evaluate per task and export one named output per head.
Choose what to share and how much each task weighs with `kmtl.search` and
`kmtl.relatedness`; `kmtl.sklearn.MultiTaskEstimator` is the scikit-learn face.

Example:

>>> import kmtl
>>> from kmtl import heads, trunks
>>> model = kmtl.build_model(heads=[heads.Classification("digit", 10), heads.Binary("parity")],
...                          trunk=trunks.dense((32,)), input_shape=(8, 8, 1))
>>> model.compile(optimizer="adam")
"""

from kmtl import (
    architectures,
    backend,
    baselines,
    benchmark,
    benchmark_movielens,
    callbacks,
    data,
    delta,
    diagnostics,
    distributed,
    errors,
    evaluation,
    experiment,
    export,
    heads,
    inputs,
    logs,
    objective,
    plots,
    registry,
    relatedness,
    search,
    sklearn,
    trunks,
    weighting,
)
from kmtl.callbacks import TrainingGuard
from kmtl.errors import LabelError, NonFiniteLossError
from kmtl.evaluation import Report, delta_m, evaluate
from kmtl.model import MultiTaskModel, build_model, compile_model
from kmtl.objective import TaskObjective

__version__ = "0.1.0"

__all__ = [
    "LabelError",
    "MultiTaskModel",
    "NonFiniteLossError",
    "Report",
    "TaskObjective",
    "TrainingGuard",
    "architectures",
    "backend",
    "baselines",
    "benchmark",
    "benchmark_movielens",
    "build_model",
    "callbacks",
    "compile_model",
    "data",
    "delta",
    "delta_m",
    "diagnostics",
    "distributed",
    "errors",
    "evaluate",
    "evaluation",
    "experiment",
    "export",
    "heads",
    "inputs",
    "logs",
    "objective",
    "plots",
    "registry",
    "relatedness",
    "search",
    "sklearn",
    "trunks",
    "weighting",
]
