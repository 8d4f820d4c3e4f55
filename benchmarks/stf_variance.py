"""Stable Target Field's variance reduction per noise level, measured against the exact posterior mean.

    python benchmarks/stf_variance.py              # ~1 min on 2 CPU cores, no training
    python benchmarks/stf_variance.py --plot docs/stf_variance.png

On the Gaussian mixture fitted to the digits (docs/algorithms.md 7) the optimal denoiser D* is
exact, so the quality of a regression target is measurable: the standard x0 target's mean squared
distance to D* is the Bayes error; STF's (docs/algorithms.md 2) is ``E||x0_STF - D*||^2``. The
table gives their ratio (the fraction of the target variance STF keeps; 1 = no reduction) at the
study's 8 noise levels (VE sigma), for several reference-set sizes, class-masked as in training.
The references are the batch plus fresh mixture draws; everything is seeded.
"""

from __future__ import annotations

import argparse

import torch

from lightning_diffusion.core.targets import stf_target
from lightning_diffusion.data import GaussianMixture
from lightning_diffusion.metrics.mixture import sigma_grid


def measure(sizes: list[int], batch: int, seed: int) -> tuple[list[float], list[float], list[list[float]]]:
    """(sigmas, Bayes error per pixel, [level][size] ratio of STF's error to the Bayes error)."""
    mixture = GaussianMixture.digits()
    generator = torch.Generator().manual_seed(seed)
    x0, labels = mixture.sample(batch, generator)
    sigmas = sigma_grid(8, 0.05, 20.0).tolist()
    bayes, ratios = [], []
    for sigma in sigmas:
        x_t = x0 + sigma * torch.randn(x0.shape, generator=generator)
        d_star, expected = mixture.posterior(x_t, 1.0, sigma, labels)
        plain = (x0.double().reshape(batch, -1) - d_star).square().mean()
        bayes.append(float(expected.mean()) / mixture.dim)
        row = []
        for n in sizes:
            refs, ref_labels = mixture.sample(n - batch, generator)
            target = stf_target(x_t, sigma, torch.cat([x0, refs]), labels=labels,
                                ref_labels=torch.cat([labels, ref_labels]))
            row.append(float((target.double().reshape(batch, -1) - d_star).square().mean() / plain))
        ratios.append(row)
    return sigmas, bayes, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384], help="references (incl. batch)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="also write a PNG of the table")
    args = p.parse_args()
    sigmas, bayes, ratios = measure(args.sizes, args.batch, args.seed)
    print("STF target error / standard target error (= Bayes error), per noise level; 1.00 = no reduction")
    print(f"{'sigma':>7} {'Bayes/px':>9} " + " ".join(f"{'n=' + str(n):>8}" for n in args.sizes))
    for sigma, b, row in zip(sigmas, bayes, ratios):
        print(f"{sigma:7.3f} {b:9.4f} " + " ".join(f"{r:8.3f}" for r in row))
    if args.plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for j, n in enumerate(args.sizes):
            ax.plot(sigmas, [row[j] for row in ratios], marker="o", label=f"{n} references")
        ax.set(xscale="log", yscale="log", xlabel="noise level σ", ylim=(1e-4, 1.5),
               ylabel="STF error / standard target error", title="STF target variance vs the exact D*")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
