"""kmtl's own exceptions (no imports, so every module can raise them)."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A training batch produced a NaN or infinite loss or gradient.

    The batch changed nothing: model weights, optimizer slots and iterations
    and the weighting strategy's state are as they were before it.

    Attributes:
        task: the first task whose loss (or gradient) was not finite, or
            `None` when the combination of finite per-task values was not.
    """

    def __init__(self, message: str, task: str | None = None):
        super().__init__(message)
        self.task = task


class LabelError(ValueError):
    """A target holds values its head cannot accept (e.g. a class out of range)."""


__all__ = ["LabelError", "NonFiniteLossError"]
