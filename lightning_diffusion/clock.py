"""The one clock: images seen, globally (ALGORITHMS.md 0, DESIGN.md "One clock").

``nimg = global_step * per_device_batch * world_size * accumulate_grad_batches``. Every schedule
(EMA decay, snapshot cadence, LR ramp, curriculum, sampler cadence) reads this helper; steps are
derived from it, never the other way round.
"""

from __future__ import annotations

import lightning.pytorch as pl

__all__ = ["images_seen", "images_per_step", "per_device_batch_size"]


def per_device_batch_size(trainer: pl.Trainer) -> int:
    """Images one rank trains on per micro-batch, as the module recorded it (or the DataModule says)."""
    size = getattr(trainer.lightning_module, "batch_size_per_device", None)
    if not size:
        size = getattr(trainer.datamodule, "batch_size", None)
    if not size:
        raise RuntimeError(
            "images_seen needs the per-device batch size: train a DiffusionLightningModule or give the "
            "DataModule a batch_size attribute."
        )
    return int(size)


def images_per_step(trainer: pl.Trainer) -> int:
    """Images consumed globally by one optimizer step."""
    return per_device_batch_size(trainer) * trainer.world_size * trainer.accumulate_grad_batches


def images_seen(trainer: pl.Trainer) -> int:
    """Images seen globally after ``trainer.global_step`` optimizer steps."""
    return trainer.global_step * images_per_step(trainer)
