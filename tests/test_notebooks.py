"""Runs every notebook top to bottom with small settings (KMTL_FAST=1).

Notebooks 01-03, 05 and 07 fall back to the bundled digits without MNIST; 04 is
about the real MNIST / Fashion-MNIST files and 06 about MovieLens 100K: each
is skipped, with the reason, when its files are not under `$KMTL_DATA_DIR`.
"""

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NEEDS_DATA = {"04_data.ipynb": ("mnist", "fashion_mnist"), "06_recommender.ipynb": ("movielens",)}


def _available(kmtl, dataset):
    if dataset == "movielens":
        return kmtl.data.movielens_available()
    return kmtl.data.available(dataset)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    import kmtl

    missing = [d for d in NEEDS_DATA.get(path.name, ()) if not _available(kmtl, d)]
    if missing:
        pytest.skip(f"{path.name} needs {missing} under $KMTL_DATA_DIR (see the README, Data)")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("KMTL_FAST", "1")
    if os.environ.get("KMTL_DATA_DIR"):
        # The kernel runs in tmp_path: a relative data path must not depend on it.
        monkeypatch.setenv("KMTL_DATA_DIR", str(Path(os.environ["KMTL_DATA_DIR"]).resolve()))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert images, f"{path.name} shows no plot"
    assert os.environ["KMTL_FAST"] == "1"
