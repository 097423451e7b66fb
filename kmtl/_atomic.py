"""Atomic file replacement: write a temporary sibling, flush it to disk, move it over the target.

A kill at any moment leaves the old file (or none) at the target, never a
partial one; the temporary file of a killed write is a hidden `.<name>.*.tmp`
sibling that readers ignore.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def replace_file(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    """Calls `write(handle)` on a temporary sibling of `path`, then moves it over `path`.

    The temporary file is flushed and `fsync`ed before `os.replace`; it is
    deleted if `write` (or the move) fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
