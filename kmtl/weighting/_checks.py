"""Argument validators shared by the weighting strategies.

Each returns the checked value in its canonical Python type and raises a
`ValueError` that names the argument and ends with what was received. NumPy
scalars are numbers like any other; booleans are not.
"""

from __future__ import annotations

import math
import numbers
import random
from typing import Sequence


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number(
    value,
    argument: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval given by `low`/`high` (closed unless `*_open`)."""
    ok = _is_number(value) and math.isfinite(float(value))
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) < high if high_open else float(value) <= high
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        bound = f" {' and '.join(parts)}" if parts else ""
        raise ValueError(f"`{argument}` must be a finite number{bound}. Received: {argument}={value!r}")
    return float(value)


def integer(value, argument: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (Python or NumPy, not bool) in `[low, high]`."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and low is not None:
        ok = int(value) >= low
    if ok and high is not None:
        ok = int(value) <= high
    if not ok:
        bounds = {
            (True, True): f" in [{low}, {high}]",
            (True, False): f" >= {low}",
            (False, True): f" <= {high}",
        }
        bound = bounds.get((low is not None, high is not None), "")
        raise ValueError(f"`{argument}` must be an integer{bound}. Received: {argument}={value!r}")
    return int(value)


def positive_int(value, argument: str) -> int:
    """An integer >= 1."""
    return integer(value, argument, low=1)


def choice(value, argument: str, options: Sequence[str]) -> str:
    """One of `options`."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"`{argument}` must be one of {tuple(options)}. Received: {argument}={value!r}")
    return value


def seed(value) -> int:
    """A seed in [0, 2**63); `None` draws one (the caller keeps it in its config).

    The draw comes from Python's `random` module, which
    `keras.utils.set_random_seed` seeds: after it, a strategy built with
    `seed=None` draws the same seed in every run (and on every process of a
    distributed job); without it, a fresh one per process.
    """
    if value is None:
        value = random.randrange(2**31)
    return integer(value, "seed", low=0, high=2**63 - 1)


def task_names(names) -> list[str]:
    """A non-empty list of distinct task names (strings)."""
    if isinstance(names, str):
        raise ValueError(f"Task names must be a list of strings. Received: {names!r}")
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"A weighting strategy needs a non-empty list of distinct task names. Received: {names!r}"
        )
    return names


def names(value, argument: str) -> tuple[str, ...]:
    """A list (or tuple) of non-empty strings, e.g. task names checked later with `names_subset`."""
    ok = isinstance(value, (list, tuple)) and all(isinstance(n, str) and n for n in value)
    if not ok:
        raise ValueError(f"`{argument}` must be a list of task names. Received: {argument}={value!r}")
    return tuple(value)


def names_subset(names, argument: str, tasks: Sequence[str]) -> tuple[str, ...]:
    """A list of strings, each one of `tasks` (checked when the strategy is built)."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"`{argument}` must be a list of task names. Received: {argument}={names!r}")
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ValueError(
            f"`{argument}` names tasks {unknown} that the model does not have (tasks: {list(tasks)}). "
            f"Received: {argument}={list(names)!r}"
        )
    return tuple(names)
