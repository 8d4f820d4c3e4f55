"""Every notebook in notebooks/ runs top to bottom (quick mode) and leaves the outputs it promises."""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# Files a notebook writes into its working folder (notebooks not listed must simply run).
EXPECTED_FILES = {
    "posthoc_ema.ipynb": ["posthoc_ema_sweep.png", "posthoc_ema_profiles.png", "phema/manifest.json"],
    "quickstart.ipynb": ["curriculum_stages.png", "loss_aware_distribution.png", "samplers_samples.png"],
    "latents.ipynb": ["latents_reconstructions.png", "latents_samples.png", "latents/normalization.json"],
    "convergence.ipynb": ["convergence.png", "convergence_by_arm.png", "convergence_mixture.png",
                          "convergence_mixture_levels.png"],
}


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
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    if path.name == "quickstart.ipynb":  # 60 steps, 4 clusters, 10 steps per stage at most
        assert "final stage 4 of 4" in text
        lowest = ast.literal_eval(re.search(r"lowest t drawn in each stage: (\{.*\})", text).group(1))
        assert sorted(lowest) == [1, 2, 3, 4]
        for stage, t_min in lowest.items():  # stage s draws only the s noisiest quarters of t = 0..999
            assert 1000 * (1 - stage / 4) <= t_min < 1000 * (1 - (stage - 1) / 4)
        weighted, plain = re.search(r"sum_t p_t \* w_t \* L_t = ([\d.]+); mean_t L_t over the sampled range = ([\d.]+)",
                                    text).groups()
        assert abs(float(weighted) - float(plain)) <= 1e-6 * max(1.0, float(plain))  # importance weights: unbiased
    if path.name == "posthoc_ema.ipynb":  # the sweep and the profiles are shown inline as well
        images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert len(images) == 2
        text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
        assert text.count("val/fd=") == 4 and "nan" not in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_shows_its_figures(path):
    # A reader on the repository page sees the executed notebook: every code cell ran, and the
    # figures are there, without running anything.
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name} has cells that were not executed"
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} is committed without its figures"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
