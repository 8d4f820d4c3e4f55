"""``lightning-diffusion-phema sweep``: rebuild several sigma_rel, score each with validate, table/CSV/PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.phema_tool import main
from test_cli import tiny_args

POSTHOC_EMA = """
trainer:
  callbacks:
    - class_path: lightning_diffusion.callbacks.PostHocEMA
      init_args:
        sigma_rels: [0.05, 0.10]
        snapshot_every_nimg: 64
        validate_with: 0.10
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.timeout(120)
def test_sweep_writes_one_finite_row_per_sigma_rel(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "posthoc_ema.yaml"
    overlay.write_text(POSTHOC_EMA)
    fit = DiffusionCLI(args=["fit", *tiny_args(tmp_path, steps=12), "--config", str(overlay)])
    run_dir = Path(fit.trainer.log_dir)
    assert len(list((run_dir / "phema").glob("phema-*.pt"))) == 12  # 6 snapshots x 2 profiles
    capsys.readouterr()

    # The saved config validates with PostHocEMA(validate_with=0.10): validate must take a rebuilt
    # checkpoint's weights as they are (it holds no EMA state to swap in).
    assert "PostHocEMA" in (run_dir / "config.yaml").read_text()
    sigma_rels = ["0.04", "0.08", "0.15"]
    # No --config: the run's saved config.yaml; extra --key=value go to validate.
    main(["sweep", str(run_dir), "--sigma_rel", *sigma_rels, "--out", str(tmp_path / "sweep"),
          "--trainer.limit_val_batches=1"])
    printed = capsys.readouterr().out
    assert "<- best" in printed and "sweep.png" in printed

    with open(tmp_path / "sweep" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["sigma_rel"] for r in rows] == [str(float(s)) for s in sigma_rels]
    values = [float(r["val/fd"]) for r in rows]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert [r["best"] for r in rows].count("True") == 1 and rows[values.index(min(values))]["best"] == "True"
    assert len(set(values)) == 3  # each row scored its own weights
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rebuilt = torch.load(rows[0]["checkpoint"], weights_only=True)
    assert rebuilt["phema"] == {"sigma_rel": 0.04, "nimg": 12 * 32}


def test_sweep_refuses_bad_sigma_rel_and_other_commands_refuse_extra_args(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(tmp_path), "--sigma_rel", "0.3"])
    assert exit_info.value.code == 2 and "sigma_rel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["list", str(tmp_path), "--trainer.max_steps=3"])
