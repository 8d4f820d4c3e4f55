"""Tables and plots of a convergence study from its ``curves.csv`` (used by convergence.py and the notebook).

An FD on a few hundred samples moves by several points between evaluations, so every FD curve is
first smoothed by a trailing mean over ``window`` evaluations (3 by default; 1: raw). "Final FD"
is the smoothed value at the last evaluation (the mean of the last ``window`` FDs).

Speed-up: the target is the baseline's final FD (mean over seeds). For each run, the steps (and
training seconds) until its smoothed FD first reaches the target, linearly interpolated between
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

import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves; notebooks stay inline


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


def crossing(rows: list[dict], target: float, key: str, metric: str = "val_fd") -> float | None:
    """``key`` (step or train_seconds) where ``metric`` (lower is better) first reaches ``target``, interpolated."""
    prev = None
    for r in rows:
        if r[metric] <= target:
            if prev is None or prev[metric] == r[metric]:
                return r[key]
            frac = (prev[metric] - target) / (prev[metric] - r[metric])
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


def smoothed(rows: list[dict], window: int, metric: str = "val_fd") -> list[dict]:
    """The rows with ``metric`` replaced by its trailing mean over ``window`` evaluations."""
    values = [r[metric] for r in rows]
    return [{**r, metric: statistics.fmean(values[max(0, i + 1 - window): i + 1])} for i, r in enumerate(rows)]


def summarize(curves: dict[str, dict[int, list[dict]]], baselines: dict[str, str],
              window: int = 3) -> list[dict[str, Any]]:
    """One row per arm: final FD/loss over seeds, speed-ups in steps and wall-clock to the baseline's final FD."""
    curves = {arm: {seed: smoothed(rows, window) for seed, rows in runs.items()} for arm, runs in curves.items()}
    out = []
    for arm, runs in curves.items():
        base_runs = curves.get(baselines.get(arm, "baseline"), runs)
        target = statistics.fmean(rows[-1]["val_fd"] for rows in base_runs.values())
        row: dict[str, Any] = {"arm": arm, "baseline": baselines.get(arm, "baseline"), "target_fd": target,
                               "final_fd": [rows[-1]["val_fd"] for rows in runs.values()],
                               "final_loss": [rows[-1]["val_loss"] for rows in runs.values()],
                               "final_mse_x0": [rows[-1]["val_mse_x0"] for rows in runs.values()]}
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


def markdown_table(summary: list[dict[str, Any]], descriptions: dict[str, str], window: int = 3) -> str:
    final = "final FD" if window == 1 else f"final FD (last {window} evals)"
    lines = [f"| arm | what | {final} | final x0 MSE | reached baseline FD | speed-up (steps) | speed-up (wall-clock) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['arm']} | {descriptions.get(r['arm'], '')} (vs {r['baseline']}) | {_fmt(r['final_fd'])} "
                     f"| {_fmt(r['final_mse_x0'], 4)} | {r['reached']} | {r['speedup_step']} | {r['speedup_train_seconds']} |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, list[dict]]], path: str | Path) -> None:
    """FD vs steps, FD vs training wall-clock, x0 MSE vs steps: mean over seeds, shaded min-max range.

    The x0 MSE on the fixed noise grid is comparable across weightings (``val_loss`` carries each
    arm's own weighting, so Min-SNR's is lower by construction); EDM arms use their own grid.
    """
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("step", "val_fd"), ("train_seconds", "val_fd"), ("step", "val_mse_x0"))
    for arm, runs in curves.items():
        steps = sorted({r["step"] for rows in runs.values() for r in rows})
        color = None
        for ax, (x_key, key) in zip(axes, panels):
            rows_at = [[r for rows in runs.values() for r in rows if r["step"] == s] for s in steps]
            xs = [statistics.fmean(r[x_key] for r in rs) for rs in rows_at]
            ys = [[r[key] for r in rs] for rs in rows_at]
            line, = ax.plot(xs, [statistics.fmean(v) for v in ys], label=arm, color=color,
                            lw=2 if "baseline" in arm else 1.3, ls="--" if "baseline" in arm else "-")
            color = line.get_color()
            ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=color, alpha=0.12)
    axes[0].set(xlabel="optimizer steps", ylabel="FD (digits features, lower is better)", yscale="log")
    axes[1].set(xlabel="training wall-clock, s (validation excluded)", ylabel="FD", yscale="log")
    axes[2].set(xlabel="optimizer steps", ylabel="x0 MSE on the fixed noise grid", yscale="log")
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
