"""Comparable validation: losses on a fixed noise-level grid with fixed noise, and level buckets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .core.noise import NoiseProcess

if TYPE_CHECKING:
    from .module import DiffusionLightningModule

__all__ = ["validation_losses", "level_buckets", "bucket_means"]


def level_buckets(process: NoiseProcess, level: Tensor, num_buckets: int) -> Tensor:
    """Bucket index per sample by training quantile of its noise level (0 = least noise)."""
    q = process.training_quantile(level)
    return (q * num_buckets).long().clamp_(0, num_buckets - 1)


@torch.no_grad()
def validation_losses(
    module: DiffusionLightningModule, x0: Tensor, labels: Tensor | None, generator: torch.Generator
) -> dict[str, Tensor]:
    """Mean weighted loss and x0-space MSE over the process's fixed grid of ``val_levels`` levels.

    The grid and the noise (from ``generator``) are fixed, so runs with different timestep
    distributions or callbacks are compared on the same objective. ``mse_x0`` ignores the
    weighting, so it also compares runs with different weightings.
    """
    param, process = module.param, module.process
    grid = process.validation_levels(module.val_levels).to(x0.device)
    loss = x0.new_zeros((), dtype=torch.float32)
    mse_x0 = x0.new_zeros((), dtype=torch.float32)
    for level_value in grid:
        level = level_value.expand(x0.shape[0])
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        output, x_noisy, mse, weight = module.weighted_mse(x0, noise, level, labels)
        loss = loss + (weight * mse).mean()
        # Clamped to the data range so the near-pure-noise levels do not drown the rest.
        x0_hat = param.to_x0(output.float(), x_noisy.float(), level).clamp(-1, 1)
        mse_x0 = mse_x0 + (x0_hat - x0.float()).square().mean()
    n = len(grid)
    return {"loss": loss / n, "mse_x0": mse_x0 / n}


def bucket_means(process: NoiseProcess, level: Tensor, per_sample: Tensor, num_buckets: int = 4) -> dict[int, Tensor]:
    """Mean loss per noise-level bucket (0 = least noise), for the buckets that hold samples (one host read)."""
    buckets = level_buckets(process, level, num_buckets)
    sums = torch.zeros(num_buckets, device=per_sample.device).index_add_(0, buckets, per_sample.float())
    counts = torch.bincount(buckets, minlength=num_buckets).tolist()
    return {k: sums[k] / n for k, n in enumerate(counts) if n}
