"""What a timestep sampler learned, for people: level quantiles and histograms in the logger, a Rich
table of the adaptive sampler's subset S. Shared by the two sampler callbacks; rank 0 writes.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from rich.table import Table
from torch import Tensor

__all__ = ["log_levels", "subset_table"]

_QUANTILES = (0.1, 0.5, 0.9)


def log_levels(trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str, levels: Tensor,
               discrete: bool) -> None:
    """Log the 10/50/90% quantiles of drawn levels (t, or sigma) and, with TensorBoard, a histogram
    (of t, or of ln sigma)."""
    values = levels.detach().float().flatten()
    q = torch.quantile(values, torch.tensor(_QUANTILES, device=values.device))
    name = "t" if discrete else "sigma"
    for p, v in zip(_QUANTILES, q):
        pl_module.log(f"{prefix}/{name}_q{round(p * 100)}", v)
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            shown = values if discrete else values.log()
            logger.experiment.add_histogram(f"{prefix}/{name if discrete else 'ln_sigma'}", shown.cpu(),
                                            trainer.global_step)


def subset_table(grid_levels: Tensor, subset: list[int], scores: list[float], discrete: bool, step: int) -> Table:
    """A Rich table of the selected look-ahead levels and their |Pearson r| with the total decrease."""
    table = Table(title=f"AdaptiveTimestepSampling: subset S at step {step}")
    table.add_column("grid index", justify="right")
    table.add_column("t" if discrete else "sigma", justify="right")
    table.add_column("|r| with total decrease", justify="right")
    for i in subset:
        level = grid_levels[i]
        table.add_row(str(i), str(int(level)) if discrete else f"{float(level):.4g}", f"{scores[i]:.3f}")
    return table
