"""WallClock: log the training time so far (validation excluded) with every validation's metrics."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from ..clock import ImageClock, images_seen

__all__ = ["WallClock"]


class WallClock(pl.Callback):
    """Log ``time/train_seconds`` (training wall-clock, validation excluded), ``time/global_step`` and ``time/images_seen``.

    Convergence comparisons at equal wall-clock read this column next to ``val/loss`` and ``val/fd``
    (``benchmarks/convergence.py`` does). Resumes continue the count (it is in the checkpoint).
    On CUDA the clock is read after a device synchronize at validation boundaries only.

    Example::

        trainer = pl.Trainer(callbacks=[WallClock()])
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self._since: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ImageClock.attach(trainer)

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = self._now(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._since is not None:
            self.train_seconds += self._now(pl_module) - self._since
            self._since = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            # The step and the clock beside the metrics: CSV rows of validation carry step - 1.
            pl_module.log("time/train_seconds", self.train_seconds, sync_dist=False)
            pl_module.log("time/global_step", float(trainer.global_step), sync_dist=False)
            pl_module.log("time/images_seen", float(images_seen(trainer)), sync_dist=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validation inside fit: training resumes now
            self._since = self._now(pl_module)

    def state_dict(self) -> dict[str, float]:
        return {"train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.train_seconds = float(state["train_seconds"])
