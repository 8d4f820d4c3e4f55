"""What the loss-aware and adaptive samplers learned, next to the per-level excess error they should follow.

    python benchmarks/learned_levels.py                       # after python benchmarks/convergence.py
    python benchmarks/learned_levels.py --study outputs/convergence/mixture --arms loss_aware adaptive

For each run of the given arms in the mixture study (``<study>/runs/<arm>-seed<k>``) the final
checkpoint is restored with its config through the CLI and ``Trainer.validate(ckpt_path=...)`` (the sampler's state
comes back with its callback), 20,000 noise levels are drawn from the module's learned ``timesteps``
(the adaptive sampler on a batch of validation images), converted to VE ``sigma = s/a`` and
histogrammed in log sigma. ``learned_levels.csv`` holds the densities per arm and seed and
``learned_levels.png`` plots them (mean over seeds) next to each arm's final per-level excess error
(docs/algorithms.md 7.2). A sampler that "follows the loss" puts mass where the excess is large.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BINS = torch.linspace(math.log(0.02), math.log(80.0), 25)  # ln sigma edges: 24 bins over [0.02, 80]


def draw_levels(run_dir: Path, draws: int) -> torch.Tensor:
    """ln sigma of ``draws`` levels from the run's restored timestep distribution."""
    from lightning_diffusion.cli import DiffusionCLI

    log_dir = run_dir / "lightning_logs" / "version_0"
    import yaml

    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    for key in ("ckpt_path", "weights_only"):  # a fit's keys; without a subcommand the parser has none
        config.pop(key, None)
    config["trainer"].update(logger=False, limit_val_batches=1, enable_progress_bar=False,
                             enable_model_summary=False)
    cli = DiffusionCLI(args=config, run=False)
    module, data = cli.model, cli.datamodule
    cli.trainer.validate(module, datamodule=data, ckpt_path=str(log_dir / "checkpoints" / "last.ckpt"), verbose=False)
    images, labels = data.val_dataset.images, data.val_dataset.labels
    index = torch.arange(draws) % images.shape[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        level, _ = module.timesteps.sample(draws, torch.device("cpu"), generator, x0=images[index], labels=labels[index])
    a, s = module.process.alpha_sigma(level)
    return (s.double() / a.double()).log()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default=str(HERE / "results" / "convergence_mixture"))
    p.add_argument("--arms", nargs="+", default=["loss_aware", "adaptive", "baseline"])
    p.add_argument("--draws", type=int, default=20000)
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    study = Path(args.study)
    rows = []
    for arm in args.arms:
        for run_dir in sorted((study / "runs").glob(f"{arm}-seed*")):
            ln_sigma = draw_levels(run_dir, args.draws)
            density = torch.histogram(ln_sigma.float().clamp(BINS[0], BINS[-1]), BINS).hist / args.draws
            seed = int(run_dir.name.rsplit("seed", 1)[1])
            rows += [{"arm": arm, "seed": seed, "ln_sigma_low": float(lo), "ln_sigma_high": float(hi),
                      "mass": float(m)} for lo, hi, m in zip(BINS[:-1], BINS[1:], density)]
            print(f"{arm} seed {seed}: median sigma {ln_sigma.median().exp():.3g}", flush=True)
    with open(study / "learned_levels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(study, rows, args.arms)
    print(f"wrote {study / 'learned_levels.csv'}, {study / 'learned_levels.png'}")


def plot(study: Path, rows: list[dict], arms: list[str]) -> None:
    """Mass per ln-sigma bin (mean over seeds) and, on the right axis, each arm's final per-level excess."""
    import matplotlib.pyplot as plt

    from convergence_report import load_curves
    from mixture_report import level_columns

    from lightning_diffusion.metrics.mixture import sigma_grid

    curves = load_curves(study / "curves.csv")
    sigmas = sigma_grid(len(level_columns(curves)), 0.05, 20.0).tolist()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    right = ax.twinx()
    for i, arm in enumerate(arms):
        mine = [r for r in rows if r["arm"] == arm]
        centers = sorted({(r["ln_sigma_low"] + r["ln_sigma_high"]) / 2 for r in mine})
        mass = [statistics.fmean(r["mass"] for r in mine if (r["ln_sigma_low"] + r["ln_sigma_high"]) / 2 == c)
                for c in centers]
        ax.step([math.exp(c) for c in centers], mass, where="mid", color=f"C{i}", label=f"{arm}: sampled levels")
        if arm in curves:
            finals = [statistics.fmean(rows_[-1][c] for rows_ in curves[arm].values()) for c in level_columns(curves)]
            right.plot(sigmas, finals, color=f"C{i}", ls=":", marker="o", label=f"{arm}: final excess %")
    ax.set(xscale="log", xlabel="noise level σ = s/a", ylabel="fraction of drawn levels per bin")
    right.set(yscale="log", ylabel="final % above the Bayes error (dotted)")
    ax.legend(loc="upper left", fontsize=8)
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(study / "learned_levels.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
