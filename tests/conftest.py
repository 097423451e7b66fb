"""Shared pytest fixtures for kmtl.

Fixtures:
    mnist_dir: the data root from `$KMTL_DATA_DIR` (holding `mnist/` and
        `fashion-mnist/` with the official IDX files); skips the test with a
        reason when the variable is unset or the MNIST files are missing.
"""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    root = os.environ.get("KMTL_DATA_DIR")
    if not root:
        pytest.skip("KMTL_DATA_DIR is not set: real MNIST/Fashion-MNIST tests need the official files")
    root = Path(root)
    if not (root / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"KMTL_DATA_DIR={str(root)!r} has no mnist/train-images-idx3-ubyte.gz")
    return root
