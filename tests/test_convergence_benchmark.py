"""The convergence study's --quick path at a tiny budget: files, columns and finite numbers."""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence  # noqa: E402
from convergence_report import crossing, smoothed, summarize  # noqa: E402
import mixture_report  # noqa: E402


def quick_study(tmp_path, *args: str) -> tuple[Path, list[dict]]:
    """--quick on the baseline and Min-SNR, 12 steps evaluated every 6: the output folder and curves.csv rows."""
    out = convergence.main(["--quick", "--arms", "baseline", "min_snr", "--steps", "12", "--eval-every", "6",
                            *args, "--out", str(tmp_path)])
    with open(out / "curves.csv") as f:
        return out, list(csv.DictReader(f))


@pytest.mark.timeout(300)
def test_quick_study_writes_curves_plot_and_table(tmp_path):
    out, rows = quick_study(tmp_path, "--data", "digits", "--fd-samples", "32")
    assert list(rows[0]) == convergence.FIELDS
    assert sorted({(r["arm"], r["step"]) for r in rows}) == [("baseline", "12"), ("baseline", "6"),
                                                               ("min_snr", "12"), ("min_snr", "6")]
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("train_seconds", "val_loss", "val_fd"))
        assert int(r["images"]) == int(r["step"]) * 64
    assert float(rows[1]["train_seconds"]) > float(rows[0]["train_seconds"]) > 0
    assert (out / "convergence.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "| baseline |" in table and "| min_snr |" in table and "speed-up (steps)" in table


def test_speedup_is_measured_at_the_interpolated_crossing():
    base = [{"step": s, "train_seconds": s / 10, "val_fd": fd, "val_loss": 0.1, "val_mse_x0": 0.2} for s, fd in [(100, 50.0), (200, 30.0), (300, 20.0)]]
    fast = [{"step": s, "train_seconds": s / 10, "val_fd": fd, "val_loss": 0.1, "val_mse_x0": 0.2} for s, fd in [(100, 40.0), (200, 10.0), (300, 8.0)]]
    assert crossing(base, 20.0, "step") == 300
    assert crossing(fast, 20.0, "step") == pytest.approx(100 + 100 * (40 - 20) / 30)
    assert crossing(base, 5.0, "step") is None
    rows = {"baseline": {0: base}, "fast": {0: fast}}
    summary = {r["arm"]: r for r in summarize(rows, {"baseline": "baseline", "fast": "baseline"}, window=1)}
    assert summary["fast"]["speedup_step"] == f"{300 / (100 + 100 * 20 / 30):.2f}"
    assert summary["baseline"]["speedup_step"] == "1.00"


def test_fd_is_smoothed_by_a_trailing_mean_before_the_crossing():
    rows = [{"step": s, "train_seconds": s / 10, "val_fd": fd, "val_loss": 0.1, "val_mse_x0": 0.2}
            for s, fd in [(100, 60.0), (200, 18.0), (300, 30.0), (400, 12.0)]]
    assert [r["val_fd"] for r in smoothed(rows, 3)] == pytest.approx([60.0, 39.0, 36.0, 20.0])
    # A lucky single evaluation (18 at step 200) does not count as reaching 20: the trailing mean does at 400.
    assert crossing(smoothed(rows, 3), 20.0, "step") == 400
    summary = summarize({"baseline": {0: rows}}, {"baseline": "baseline"})  # window 3 by default
    assert summary[0]["final_fd"] == [pytest.approx(20.0)]


@pytest.mark.timeout(300)
def test_quick_mixture_study_writes_exact_scores_per_level(tmp_path):
    out, rows = quick_study(tmp_path, "--fd-samples", "50", "--eval-size", "64")
    assert list(rows[0]) == convergence.MIXTURE_FIELDS
    assert len(rows) == 2 * 2  # arms x evaluations (one seed in --quick)
    for r in rows:
        levels = [float(r[f"val_excess_pct_level{i}"]) for i in range(convergence.MIXTURE_LEVELS)]
        assert all(v > 0 and math.isfinite(v) for v in levels)
        # the aggregate is the geometric mean of the per-level ratios (docs/algorithms.md 7.2)
        geo = 100 * (math.exp(sum(math.log(1 + v / 100) for v in levels) / len(levels)) - 1)
        assert float(r["val_excess_pct"]) == pytest.approx(geo, rel=1e-4)
        has_samples = r["step"] == "12"  # sample scores at the last validation only
        assert math.isfinite(float(r["val_fd_exact"])) == has_samples
    table = (out / "results.md").read_text()
    assert "| min_snr |" in table and "σ=0.05" in table and "95% CI" in table and "| baseline |" in table
    assert (out / "convergence.png").stat().st_size > 10_000


def test_mixture_speedups_come_from_seed_mean_curves_with_a_paired_bootstrap():
    def run(values, seconds_per_step=0.1):
        return [{"step": s, "train_seconds": s * seconds_per_step, "val_excess_pct": v, "val_fd_exact": 1.0,
                 "val_class_accuracy": 0.9, "val_nll_gap": 0.1} for s, v in zip((100, 200, 300), values)]
    base = {0: run([80.0, 60.0, 40.0]), 1: run([90.0, 70.0, 50.0])}  # mean curve 85, 65, 45: target 45
    fast = {0: run([60.0, 40.0, 30.0]), 1: run([70.0, 50.0, 40.0])}  # mean 65, 45, 35: 45 reached at step 200
    slow = {0: run([90.0, 80.0, 70.0]), 1: run([95.0, 85.0, 75.0])}
    first = {0: run([40.0, 30.0, 20.0]), 1: run([44.0, 30.0, 20.0])}
    summary = {r["arm"]: r for r in mixture_report.summarize(
        {"baseline": base, "fast": fast, "slow": slow, "first": first},
        {"baseline": "baseline", "fast": "baseline", "slow": "baseline", "first": "baseline"}, window=1)}
    s = summary["fast"]["speedup_step"]
    assert s["point"] == pytest.approx(1.5) and s["reached"]
    assert s["low"] <= 1.5 <= s["high"]  # resampled seed sets: {0,0}, {1,1} and mixes, all paired
    assert summary["baseline"]["speedup_step"]["point"] == pytest.approx(1.0)
    assert not summary["slow"]["speedup_step"]["reached"]
    assert mixture_report._speedup_text(summary["slow"]["speedup_step"]) == "< 1.00 (not reached)"
    assert summary["first"]["speedup_step"]["at_first"]  # at least 3x: evaluations are not finer
    assert mixture_report._speedup_text(summary["first"]["speedup_step"]).startswith("≥ 3.00")
    assert summary["baseline"]["baseline_final_cv"] == pytest.approx(statistics.stdev([40, 50]) / 45)
