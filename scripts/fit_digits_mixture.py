"""Write lightning_diffusion/data/assets/digits_mixture.npz: a Gaussian mixture fitted to the embedded digits.

3 full-covariance components per class, fitted by EM to all 1,797 embedded 8x8 digits (pixels in
[-1, 1], 64 dimensions), covariances regularized by 3e-3 on the diagonal (docs/algorithms.md 7.1).
Deterministic (seed 0); a few seconds on a CPU:

    python scripts/fit_digits_mixture.py [--components 3] [--reg 3e-3] [--out PATH]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from lightning_diffusion.data.embedded import DIGITS_PATH
from lightning_diffusion.data.mixture import DIGITS_MIXTURE_PATH
from lightning_diffusion.data.mixture_fit import fit_mixture


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--components", type=int, default=3, help="components per class")
    p.add_argument("--reg", type=float, default=3e-3, help="added to every covariance's diagonal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DIGITS_MIXTURE_PATH)
    args = p.parse_args()
    with np.load(DIGITS_PATH, allow_pickle=False) as f:
        images = torch.from_numpy(f["images"]).double().unsqueeze(1) / 127.5 - 1.0
        labels = torch.from_numpy(f["labels"]).long()
    mixture, logliks = fit_mixture(images, labels, args.components, args.reg, args.seed)
    mixture.save(args.out)
    held = mixture.log_prob(images.float(), labels).mean() / mixture.dim
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {mixture.weights.numel()} components, "
          f"mean log p(x | c) of the digits {held:.3f} nats/pixel; per class "
          + ", ".join(f"{c}: {ll / mixture.dim:.3f}" for c, ll in logliks.items()))


if __name__ == "__main__":
    main()
