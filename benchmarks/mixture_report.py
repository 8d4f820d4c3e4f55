"""Tables and plots of the Gaussian-mixture convergence study (used by convergence.py and the notebook).

The primary metric is ``val_excess_pct``: how far the model's denoising error sits above the Bayes
error, as the geometric mean over 8 fixed noise levels (docs/algorithms.md 7.2). It is exact (no
reference sample), but the model itself fluctuates between evaluations (Adam at a constant
learning rate), so curves are smoothed by a trailing mean over ``window`` evaluations first.

Speed-up, paired by seed: the target is the baseline's final smoothed value (mean over seeds); for
each seed, the steps (and training seconds) at which the baseline run and the arm's run first
reach it (interpolated), and their ratio. Same seed means same initialization and data order, so
the pairing removes much of the seed-to-seed spread. Reported as the mean ratio with a 95%
Student-t interval over seeds; a seed whose run never reaches the target is counted apart.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from convergence_report import crossing, load_curves, smoothed

METRIC = "val_excess_pct"
# Two-sided 95% Student-t quantiles by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, 95% half-width) over seeds; half-width NaN for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def _ci(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, half = interval(values)
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def level_columns(curves: dict) -> list[str]:
    first = next(iter(next(iter(curves.values())).values()))[0]
    return sorted((k for k in first if k.startswith(f"{METRIC}_level")), key=lambda k: int(k.rsplit("level", 1)[1]))


def summarize(curves: dict[str, dict[int, list[dict]]], baselines: dict[str, str], window: int = 3) -> list[dict]:
    """One row per arm: final scores over seeds, paired speed-ups in steps and wall-clock with 95% intervals."""
    smooth = {arm: {seed: smoothed(rows, window, METRIC) for seed, rows in runs.items()} for arm, runs in curves.items()}
    out = []
    for arm, runs in smooth.items():
        base_name = baselines.get(arm, "baseline")
        base_runs = smooth.get(base_name, runs)
        target = statistics.fmean(rows[-1][METRIC] for rows in base_runs.values())
        last = {seed: curves[arm][seed][-1] for seed in runs}
        row: dict[str, Any] = {"arm": arm, "baseline": base_name, "target": target,
                               "final": [rows[-1][METRIC] for rows in runs.values()]}
        for key in ("val_fd_exact", "val_class_accuracy", "val_nll_gap"):
            row[key] = [r[key] for r in last.values() if not math.isnan(r[key])]
        for key in ("step", "train_seconds"):
            ratios, missed = [], 0
            for seed, rows in runs.items():
                base, mine = crossing(base_runs.get(seed, []), target, key, METRIC), crossing(rows, target, key, METRIC)
                if base is None or mine is None or mine <= 0:
                    missed += 1
                else:
                    ratios.append(base / mine)
            row[f"speedup_{key}"] = ratios
            row["missed"] = missed
        base_steps = [crossing(rows, target, "step", METRIC) for rows in base_runs.values()]
        base_steps = [s for s in base_steps if s is not None]
        row["baseline_steps_cv"] = (statistics.stdev(base_steps) / statistics.fmean(base_steps)
                                    if len(base_steps) > 1 else math.nan)
        out.append(row)
    return out


def markdown_table(summary: list[dict], descriptions: dict[str, str]) -> str:
    lines = ["| arm | what | % above Bayes (final) | speed-up, steps (95% CI) | speed-up, wall-clock | "
             "exact FD | class accuracy | NLL gap (nats/px) |", "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        missed = f" ({r['missed']} seed(s) not reached)" if r["missed"] else ""
        lines.append(f"| {r['arm']} | {descriptions.get(r['arm'], '')} (vs {r['baseline']}) | {_ci(r['final'], 1)} "
                     f"| {_ci(r['speedup_step'])}{missed} | {_ci(r['speedup_train_seconds'])} "
                     f"| {_ci(r['val_fd_exact'], 3)} | {_ci(r['val_class_accuracy'], 3)} | {_ci(r['val_nll_gap'], 3)} |")
    return "\n".join(lines)


def level_table(curves: dict[str, dict[int, list[dict]]], sigmas: list[float], window: int = 3) -> str:
    """Final per-level % above Bayes (mean over seeds, trailing mean over ``window`` evaluations)."""
    columns = level_columns(curves)
    lines = ["| arm | " + " | ".join(f"σ={s:.3g}" for s in sigmas) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm, runs in curves.items():
        finals = [statistics.fmean(statistics.fmean(r[c] for r in rows[-window:]) for rows in runs.values())
                  for c in columns]
        lines.append(f"| {arm} | " + " | ".join(f"{v:.1f}" for v in finals) + " |")
    return "\n".join(lines)


def resolution(summary: list[dict]) -> str:
    """What the study can resolve: the seed spread of the baseline's steps-to-target, the widest paired CI."""
    base = next((r for r in summary if r["arm"] == r["baseline"]), summary[0])
    halves = [interval(r["speedup_step"])[1] for r in summary if r["arm"] != r["baseline"] and len(r["speedup_step"]) > 1]
    typical = statistics.median(halves) if halves else math.nan
    return (f"Seed-to-seed spread of the baseline's steps to its own final value: {100 * base['baseline_steps_cv']:.0f}% "
            f"(coefficient of variation). Paired speed-up 95% intervals: median half-width ±{typical:.2f} "
            f"(a speed-up is resolved when its interval excludes 1.00).")


def plot(curves: dict[str, dict[int, list[dict]]], sigmas: list[float], path: str | Path, window: int = 3) -> None:
    """% above Bayes vs steps and vs wall-clock (mean over seeds, smoothed, min-max band), and per level."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    columns = level_columns(curves)
    for arm, runs in curves.items():
        runs = {seed: smoothed(rows, window, METRIC) for seed, rows in runs.items()}
        steps = sorted({r["step"] for rows in runs.values() for r in rows})
        rows_at = [[r for rows in runs.values() for r in rows if r["step"] == s] for s in steps]
        style = dict(lw=2 if "baseline" in arm else 1.3, ls="--" if "baseline" in arm else "-")
        color = None
        for ax, x_key in zip(axes[:2], ("step", "train_seconds")):
            xs = [statistics.fmean(r[x_key] for r in rs) for rs in rows_at]
            ys = [[r[METRIC] for r in rs] for rs in rows_at]
            line, = ax.plot(xs, [statistics.fmean(v) for v in ys], label=arm, color=color, **style)
            color = line.get_color()
            ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=color, alpha=0.1)
        finals = [statistics.fmean(statistics.fmean(r[c] for r in rows[-window:]) for rows in curves[arm].values())
                  for c in columns]
        axes[2].plot(sigmas, finals, marker="o", color=color, label=arm, **style)
    axes[0].set(xlabel="optimizer steps", ylabel="% above the Bayes error (geometric mean over levels)", yscale="log")
    axes[1].set(xlabel="training wall-clock, s (validation excluded)", ylabel="% above the Bayes error", yscale="log")
    axes[2].set(xlabel="noise level σ = s/a", ylabel="final % above the Bayes error at that level", xscale="log",
                yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, arms: dict[str, Any], setup: str, sigmas: list[float], window: int = 3) -> None:
    curves = load_curves(out / "curves.csv")
    summary = summarize(curves, {a: arm.baseline for a, arm in arms.items()}, window)
    table = markdown_table(summary, {a: arm.summary for a, arm in arms.items()})
    plot(curves, sigmas, out / "convergence.png", window)
    text = (f"Setup: {setup}.\n\n{table}\n\n{resolution(summary)}\n\n"
            f"Final % above the Bayes error per noise level:\n\n{level_table(curves, sigmas, window)}\n")
    (out / "results.md").write_text(text)
    if any(math.isnan(r[METRIC]) for runs in curves.values() for rows in runs.values() for r in rows):
        raise SystemExit(f"a run produced a NaN {METRIC}; see curves.csv")
