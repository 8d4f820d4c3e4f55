"""The CPU dry run of benchmarks/gpu_check.py: every row measured, the JSON complete, the fit learns."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETS = ["UNet", "EDM2UNet-XS", "EDM2UNet-S", "DiT-B/2"]
CALLBACKS = ["none", "PostHocEMA", "LossAwareTimestepSampling", "AdaptiveTimestepSampling", "TimestepCurriculum",
             "StableTargetField"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_network_row_is_measured_eager_and_compiled(report):
    data, stdout = report
    rows = [r for r in data["rows"] if r["section"] == "network"]
    assert sorted((r["net"], r["compile"]) for r in rows) == sorted(
        (n, c) for n in NETS for c in ("eager", "aot_eager"))
    for r in rows:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["hand_images_per_s"] > 0 and math.isfinite(r["ratio_to_hand"])
        assert r["gflops_per_step"] > 0  # counted by FlopCounterMode
        assert r["mfu"] is None and r["peak_gib"] is None  # CPU: no peak, no GPU memory
    for r in (r for r in rows if r["compile"] == "eager"):
        # The library's hot path, and the hand loop's, read nothing back from the device.
        assert r["syncs_per_step"] == 0, (r["net"], r["sync_ops"])
        assert r["hand_syncs_per_step"] == 0
    for r in (r for r in rows if r["compile"] != "eager"):
        assert r["graph_breaks"] == 0, r["net"]
    assert "| UNet | eager |" in stdout and "library/hand" in stdout


def test_every_callback_row_has_an_overhead(report):
    data, _ = report
    rows = {r["callback"]: r for r in data["rows"] if r["section"] == "callback"}
    assert list(rows) == CALLBACKS
    for name, r in rows.items():
        assert "error" not in r, r
        assert math.isfinite(r["overhead_pct"])
        assert r["syncs_per_step"] is not None
    assert rows["none"]["overhead_pct"] == 0.0


def test_the_full_stack_fit_lowers_the_validation_loss(report):
    data, stdout = report
    fit = next(r for r in data["rows"] if r["section"] == "fit")
    assert fit["exit_code"] == 0 and len(fit["val_losses"]) >= 2
    assert fit["lowered"] and fit["val_losses"][-1] < fit["untrained_val_loss"]
    assert data["environment"]["dry_run"] is True
    assert "lowered" in stdout


def test_bad_arguments_exit_2_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--nets", "ResNet",
                           "--json", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--nets: ['ResNet'] unknown" in proc.stderr
    assert not (tmp_path / "x.json").exists()
