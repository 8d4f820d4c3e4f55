"""Tables and plots of the Gaussian-mixture convergence study (used by convergence.py and the notebook).

The primary metric is ``val_excess_pct``: how far the model's denoising error sits above the Bayes
error, as the geometric mean over 8 fixed noise levels (docs/algorithms.md 7.2). It is exact (no
reference sample), but the model itself fluctuates between evaluations (Adam at a constant
learning rate), so curves are smoothed by a trailing mean over ``window`` evaluations first.

Speed-up: on the curves averaged over seeds, the steps (and training seconds) the baseline needs to
reach its own final value, divided by the arm's (first crossing, interpolated between
evaluations). Its 95% interval is a bootstrap over seeds: seeds are resampled with replacement,
the same ones for the arm and its baseline (a seed fixes initialization, data order and noise in
both), and the ratio recomputed. An arm that never reaches the target within the budget is
reported as "< bound"; the fraction of resamples in which it does not is given when above 2.5%.
"""

from __future__ import annotations

import math
import random
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


def final_per_level(runs: dict[int, list[dict]], columns: list[str], window: int) -> list[float]:
    """Each level's final value: the mean of the last ``window`` evaluations, averaged over seeds."""
    return [statistics.fmean(statistics.fmean(r[c] for r in rows[-window:]) for rows in runs.values())
            for c in columns]


def mean_curve(smooth_runs: dict[int, list[dict]], seeds: list[int]) -> list[dict]:
    """The (already smoothed) metric and the training seconds averaged over ``seeds`` (repeats allowed)."""
    smooth = [smooth_runs[s] for s in seeds]
    length = min(len(rows) for rows in smooth)
    return [{"step": smooth[0][i]["step"], METRIC: statistics.fmean(rows[i][METRIC] for rows in smooth),
             "train_seconds": statistics.fmean(rows[i]["train_seconds"] for rows in smooth)} for i in range(length)]


def speedup(base: list[dict], arm: list[dict], key: str) -> tuple[float, bool, bool]:
    """(baseline's ``key`` to its own final value / the arm's, reached?, reached at the first evaluation?).

    An arm that never reaches the target within its budget gets the bound ``base / last`` (its
    speed-up is below that); one already there at the first evaluation, ``base / first`` (its
    speed-up is at least that: evaluations are not finer).
    """
    target = base[-1][METRIC]
    b = crossing(base, target, key, METRIC)
    a = crossing(arm, target, key, METRIC)
    if a is None:
        return b / arm[-1][key], False, False
    return b / max(a, 1e-9), True, arm[0][METRIC] <= target


def summarize(curves: dict[str, dict[int, list[dict]]], baselines: dict[str, str], window: int = 3,
              resamples: int = 2000) -> list[dict]:
    """One row per arm: final scores over seeds; speed-ups on the seed-mean curves with bootstrap 95% intervals.

    The bootstrap resamples seeds with replacement, the same seeds for the arm and its baseline
    (a seed fixes initialization, data order and noise in both), ``resamples`` times, seeded.
    """
    rng = random.Random(0)
    smooth = {arm: {seed: smoothed(rows, window, METRIC) for seed, rows in runs.items()}
              for arm, runs in curves.items()}  # once: the bootstrap averages these thousands of times
    out = []
    for arm, runs in smooth.items():
        base_name = baselines.get(arm, "baseline")
        base_runs = smooth.get(base_name, runs)
        seeds = sorted(set(runs) & set(base_runs))
        last = {seed: rows[-1] for seed, rows in curves[arm].items()}
        row: dict[str, Any] = {"arm": arm, "baseline": base_name, "final": [rows[-1][METRIC] for rows in runs.values()]}
        for key in ("val_fd_exact", "val_class_accuracy", "val_nll_gap"):
            row[key] = [r[key] for r in last.values() if not math.isnan(r[key])]
        for key in ("step", "train_seconds"):
            point, reached, first = speedup(mean_curve(base_runs, seeds), mean_curve(runs, seeds), key)
            draws = []
            for _ in range(resamples if len(seeds) > 1 else 0):
                pick = [rng.choice(seeds) for _ in seeds]
                draws.append(speedup(mean_curve(base_runs, pick), mean_curve(runs, pick), key))
            values = sorted(d[0] for d in draws)
            row[f"speedup_{key}"] = {
                "point": point, "reached": reached, "at_first": first,
                "low": values[int(0.025 * len(values))] if values else math.nan,
                "high": values[int(0.975 * len(values)) - 1] if values else math.nan,
                "not_reached": sum(not d[1] for d in draws) / len(draws) if draws else float(not reached)}
        finals = [rows[-1][METRIC] for rows in base_runs.values()]
        row["baseline_final_cv"] = statistics.stdev(finals) / statistics.fmean(finals) if len(finals) > 1 else math.nan
        out.append(row)
    return out


def _speedup_text(s: dict) -> str:
    if not s["reached"]:
        return f"< {s['point']:.2f} (not reached)"
    if s["at_first"]:
        return f"≥ {s['point']:.2f} (reached at the first evaluation)"
    text = f"{s['point']:.2f}"
    if not math.isnan(s["low"]):
        text += f" [{s['low']:.2f}, {s['high']:.2f}]"
    if s["not_reached"] > 0.025:
        text += f" ({100 * s['not_reached']:.0f}% of resamples not reached)"
    return text


def markdown_table(summary: list[dict], descriptions: dict[str, str]) -> str:
    lines = ["| arm | what | % above Bayes (final, mean ± 95%) | speed-up, steps [95% CI] | speed-up, wall-clock | "
             "exact FD | class accuracy | NLL gap (nats/px) |", "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['arm']} | {descriptions.get(r['arm'], '')} (vs {r['baseline']}) | {_ci(r['final'], 1)} "
                     f"| {_speedup_text(r['speedup_step'])} | {_speedup_text(r['speedup_train_seconds'])} "
                     f"| {_ci(r['val_fd_exact'], 3)} | {_ci(r['val_class_accuracy'], 3)} | {_ci(r['val_nll_gap'], 3)} |")
    return "\n".join(lines)


def level_table(curves: dict[str, dict[int, list[dict]]], sigmas: list[float], window: int = 3) -> str:
    """Final per-level % above Bayes (mean over seeds, trailing mean over ``window`` evaluations)."""
    columns = level_columns(curves)
    lines = ["| arm | " + " | ".join(f"σ={s:.3g}" for s in sigmas) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm, runs in curves.items():
        finals = final_per_level(runs, columns, window)
        lines.append(f"| {arm} | " + " | ".join(f"{v:.1f}" for v in finals) + " |")
    return "\n".join(lines)


def resolution(summary: list[dict]) -> str:
    """What the study can resolve: the baseline's seed spread and the typical width of a speed-up interval."""
    base = next((r for r in summary if r["arm"] == r["baseline"]), summary[0])
    widths = [(r["speedup_step"]["high"] - r["speedup_step"]["low"]) / 2 / r["speedup_step"]["point"]
              for r in summary if r["arm"] != r["baseline"] and r["speedup_step"]["reached"]
              and not r["speedup_step"]["at_first"] and not math.isnan(r["speedup_step"]["low"])]
    typical = statistics.median(widths) if widths else math.nan
    return (f"Seed-to-seed spread of the baseline's final value: {100 * base['baseline_final_cv']:.0f}% "
            f"(coefficient of variation over seeds). Speed-up intervals (bootstrap over seeds, 95%): median "
            f"half-width ±{100 * typical:.0f}% of the speed-up; a speed-up is resolved when its interval "
            "excludes 1.00.")


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
        finals = final_per_level(curves[arm], columns, window)
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
