"""Tables and plots of a convergence study from its ``curves.csv`` (used by convergence.py and the notebook).

Speed-up: the target is the baseline's final FD (mean over seeds). For each run, the steps (and
training seconds) until its FD first reaches the target, linearly interpolated between
evaluations; the speed-up is the baseline's median over seeds divided by the arm's. Runs that never
reach the target count as "not reached" and the speed-up is reported as "< steps_baseline/steps_run".
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_curves(path: str | Path) -> dict[str, dict[int, list[dict]]]:
    """``curves[arm][seed]`` = the evaluations of that run, in step order."""
    curves: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    with open(path) as f:
        for r in csv.DictReader(f):
            row = {k: (v if k == "arm" else float(v)) for k, v in r.items()}
            curves[r["arm"]][int(r["seed"])].append(row)
    for runs in curves.values():
        for rows in runs.values():
            rows.sort(key=lambda r: r["step"])
    return curves


def crossing(rows: list[dict], target: float, key: str) -> float | None:
    """``key`` (step or train_seconds) where the FD first reaches ``target``, interpolated."""
    prev = None
    for r in rows:
        if r["val_fd"] <= target:
            if prev is None or prev["val_fd"] == r["val_fd"]:
                return r[key]
            frac = (prev["val_fd"] - target) / (prev["val_fd"] - r["val_fd"])
            return prev[key] + frac * (r[key] - prev[key])
        prev = r
    return None


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(curves: dict[str, dict[int, list[dict]]], baselines: dict[str, str]) -> list[dict[str, Any]]:
    """One row per arm: final FD/loss over seeds, speed-ups in steps and wall-clock to the baseline's final FD."""
    out = []
    for arm, runs in curves.items():
        base_runs = curves.get(baselines.get(arm, "baseline"), runs)
        target = statistics.fmean(rows[-1]["val_fd"] for rows in base_runs.values())
        row: dict[str, Any] = {"arm": arm, "baseline": baselines.get(arm, "baseline"), "target_fd": target,
                               "final_fd": [rows[-1]["val_fd"] for rows in runs.values()],
                               "final_loss": [rows[-1]["val_loss"] for rows in runs.values()]}
        for key in ("step", "train_seconds"):
            base = [crossing(rows, target, key) for rows in base_runs.values()]
            mine = [crossing(rows, target, key) for rows in runs.values()]
            base_ok, mine_ok = [b for b in base if b is not None], [m for m in mine if m is not None]
            row[f"reached"] = f"{len(mine_ok)}/{len(mine)}"
            if base_ok and mine_ok and statistics.median(mine_ok) > 0:
                ratios = [statistics.median(base_ok) / m for m in mine_ok if m > 0]
                row[f"speedup_{key}"] = _fmt(ratios) + ("" if len(mine_ok) == len(mine) else " (reached runs)")
            elif base_ok:
                last = statistics.median(rows[-1][key] for rows in runs.values())
                row[f"speedup_{key}"] = f"< {statistics.median(base_ok) / last:.2f} (not reached)"
            else:
                row[f"speedup_{key}"] = "-"
        out.append(row)
    return out


def markdown_table(summary: list[dict[str, Any]], descriptions: dict[str, str]) -> str:
    lines = ["| arm | what | final FD | final val loss | reached baseline FD | speed-up (steps) | speed-up (wall-clock) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['arm']} | {descriptions.get(r['arm'], '')} (vs {r['baseline']}) | {_fmt(r['final_fd'])} "
                     f"| {_fmt(r['final_loss'], 4)} | {r['reached']} | {r['speedup_step']} | {r['speedup_train_seconds']} |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, list[dict]]], path: str | Path) -> None:
    """FD and validation loss vs steps: mean over seeds, shaded min-max range."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, runs in curves.items():
        steps = sorted({r["step"] for rows in runs.values() for r in rows})
        for ax, key in zip(axes, ("val_fd", "val_loss")):
            by_step = [[r[key] for rows in runs.values() for r in rows if r["step"] == s] for s in steps]
            mean = [statistics.fmean(v) for v in by_step]
            line, = ax.plot(steps, mean, label=arm, lw=2 if "baseline" in arm else 1.3,
                            ls="--" if "baseline" in arm else "-")
            ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=line.get_color(), alpha=0.15)
    axes[0].set(xlabel="optimizer steps", ylabel="FD (digits features, lower is better)", yscale="log")
    axes[1].set(xlabel="optimizer steps", ylabel="validation loss (fixed noise grid)", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, arms: dict[str, Any], setup: str) -> None:
    curves = load_curves(out / "curves.csv")
    summary = summarize(curves, {a: arm.baseline for a, arm in arms.items()})
    table = markdown_table(summary, {a: arm.summary for a, arm in arms.items()})
    plot(curves, out / "convergence.png")
    text = f"Setup: {setup}.\n\n{table}\n"
    (out / "results.md").write_text(text)
    if any(math.isnan(v) for rows in curves.values() for run in rows.values() for r in run for v in (r["val_fd"],)):
        raise SystemExit("a run produced a NaN FD; see curves.csv")
