"""kmtl: multi-task learning for Keras 3 on TensorFlow.

Build a model with named heads on a shared trunk, train it with plain
`model.fit` on dict targets, weight or aggregate the tasks with
`kmtl.weighting`, evaluate per task and export one named output per head.

Example:

>>> import kmtl
>>> from kmtl import heads, trunks
>>> model = kmtl.build_model(heads=[heads.Classification("digit", 10), heads.Binary("parity")],
...                          trunk=trunks.dense((32,)), input_shape=(8, 8, 1))
>>> model.compile(optimizer="adam")
"""

from kmtl import (
    architectures,
    callbacks,
    data,
    diagnostics,
    evaluation,
    export,
    heads,
    plots,
    trunks,
    weighting,
)
from kmtl.callbacks import TrainingGuard
from kmtl.evaluation import Report, delta_m, evaluate
from kmtl.model import MultiTaskModel, NonFiniteLossError, build_model, compile_model

__version__ = "0.1.0"

__all__ = [
    "MultiTaskModel",
    "NonFiniteLossError",
    "Report",
    "TrainingGuard",
    "architectures",
    "build_model",
    "callbacks",
    "compile_model",
    "data",
    "delta_m",
    "diagnostics",
    "evaluate",
    "evaluation",
    "export",
    "heads",
    "plots",
    "trunks",
    "weighting",
]
