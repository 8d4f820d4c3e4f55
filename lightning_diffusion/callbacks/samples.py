"""SampleGrid: PNG grids of generated images after validation and at the end of ``fit``, and for ``predict``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import Tensor

from ..io import atomic_write
from ..sharding import is_sharded

__all__ = ["SampleGrid", "image_grid", "save_image_grid"]


def image_grid(images: Tensor, nrow: int | None = None, min_tile: int = 32) -> Image.Image:
    """Images in [-1, 1] ([N, C, H, W], C in {1, 3}) as one grid picture, 1 px apart.

    Small images are enlarged by an integer factor (nearest) so each tile is at least ``min_tile`` px.
    """
    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + 1) + 1, nrow * (w + 1) + 1), -1.0)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = images[i]
    pixels = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    scale = max(1, math.ceil(min_tile / max(h, w)))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, min_tile: int = 32) -> Path:
    """Write :func:`image_grid` of ``images`` as a PNG, atomically."""
    image = image_grid(images, nrow, min_tile)
    # temp file + rename: a crash never leaves a truncated PNG behind
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


class SampleGrid(pl.Callback):
    """Generate and save a grid of samples after each ``every_n_validations``-th validation and when
    ``fit`` ends (unless a grid of that step exists), and a grid per batch during ``predict``. Only
    global rank 0 writes during ``fit``; its grids also go to TensorBoard (tag ``samples``) when a
    ``TensorBoardLogger`` is among the trainer's loggers.

    Files go to ``dirpath`` (default ``<log_dir>/samples``): ``step_0002000.png``, ``last.png``,
    and ``predict_rank0_batch0000.png``. The grid at the end of ``fit`` shows the weights in the
    module then (the raw weights: an EMA callback swaps its average in for validation only).

    Example::

        trainer = pl.Trainer(callbacks=[SampleGrid(num_samples=64)])
    """

    def __init__(self, num_samples: int = 100, every_n_validations: int = 1, dirpath: str | None = None,
                 seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"SampleGrid.num_samples={num_samples} must be >= 1.")
        if every_n_validations < 1:
            raise ValueError(f"SampleGrid.every_n_validations={every_n_validations} must be >= 1.")
        self.num_samples, self.every_n_validations = num_samples, every_n_validations
        self.dirpath, self.seed = dirpath, seed
        self._validations = 0
        self._directory: Path | None = None
        self.last_path: Path | None = None
        self._written_step = -1  # global step of this fit's newest grid

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts under DDP: resolve it here, where every rank calls it.
        self._directory = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        if not self.dirpath:
            self._directory = self._directory / "samples"

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self._directory is None:
            self.setup(trainer, trainer.lightning_module, "")
        return self._directory

    def _labels(self, pl_module: pl.LightningModule) -> Tensor | None:
        num_classes = getattr(pl_module, "num_classes", 0)
        if not num_classes:
            return None
        return torch.arange(self.num_samples, device=pl_module.device) % num_classes

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._write(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written_step = -1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit shorter than val_check_interval (or ending between validations) still leaves last.png.
        if self._written_step != trainer.global_step:
            self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``step_N.png`` and ``last.png`` of the current step, and the same grid in TensorBoard (rank 0)."""
        self._written_step = trainer.global_step
        # A sharded model's forward is a collective (FSDP2 gathers each block): every rank samples then.
        if not (trainer.is_global_zero or is_sharded(pl_module)):
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        images = pl_module.sample(self.num_samples, class_labels=self._labels(pl_module), generator=generator)
        if not trainer.is_global_zero:
            return
        image = image_grid(images)
        for name in (f"step_{trainer.global_step:07d}.png", "last.png"):
            self.last_path = atomic_write(self._dir(trainer) / name, lambda f: image.save(f, format="PNG"))
        pixels = np.asarray(image)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", pixels, trainer.global_step,
                                            dataformats="HW" if pixels.ndim == 2 else "HWC")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        path = self._dir(trainer) / f"predict_rank{trainer.global_rank}_batch{batch_idx:04d}.png"
        self.last_path = save_image_grid(outputs, path)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict["validations"])
