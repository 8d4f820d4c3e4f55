"""Every notebook in notebooks/ runs top to bottom (quick mode) and leaves the outputs it promises."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# Files a notebook writes into its working folder (notebooks not listed must simply run).
EXPECTED_FILES = {"posthoc_ema.ipynb": ["posthoc_ema_sweep.png", "posthoc_ema_profiles.png", "phema/manifest.json"]}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LD_NOTEBOOK_QUICK", "1")  # the kernel inherits this environment
    monkeypatch.delenv("MASTER_PORT", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell errors
    nbformat.write(notebook, tmp_path / path.name)  # the executed copy, for a look when a check fails
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    for name in EXPECTED_FILES.get(path.name, []):
        assert (tmp_path / name).is_file(), f"{path.name} did not write {name}"
    if path.name == "posthoc_ema.ipynb":  # the sweep and the profiles are shown inline as well
        images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert len(images) == 2
        text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
        assert text.count("val/fd=") == 4 and "nan" not in text
