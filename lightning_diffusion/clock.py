"""The one clock: images seen, globally, counted (docs/algorithms.md 0, docs/architecture.md "One clock").

:class:`ImageClock` is a callback that keeps a counter in the checkpoint and advances it at each
optimizer step by that step's images over all ranks (the micro-batches' sizes, times the world
size). It is never recomputed as ``global_step * images per step``: a run resumed with another
batch size, accumulation, device or node count would recount every past step at the new rate.
Every schedule (post-hoc EMA decay and snapshots, EDM2 learning rate, curriculum switch times,
wall-clock logs) reads :func:`images_seen`. The library's callbacks and ``DiffusionLightningModule``
attach one clock in ``setup`` (:meth:`ImageClock.attach`), so users never add it by hand.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size

__all__ = ["ImageClock", "images_seen", "images_per_step", "batch_images"]


def batch_images(pl_module: pl.LightningModule, batch: Any) -> int:
    """Images in one micro-batch on this rank: ``pl_module.images_in_batch(batch)`` if the module
    defines it, else the leading size of the batch's first tensor (Lightning's ``extract_batch_size``)."""
    count = getattr(pl_module, "images_in_batch", None)
    return int(count(batch)) if callable(count) else int(extract_batch_size(batch))


class ImageClock(pl.Callback):
    """Counts images seen globally; the one clock every schedule of the library reads.

    State (``checkpoint["callbacks"]["ImageClock"]``): ``nimg`` (images seen after optimizer step
    ``step``), ``step``, ``pending`` (images of the micro-batches of an unfinished accumulation
    window) and ``images_per_step`` (the last step's). Images are counted when a micro-batch starts
    (its local size times the world size: ranks train equal batches under a distributed sampler) and
    credited once ``trainer.global_step`` has moved past the step they belong to, so the hook order
    among callbacks does not matter. A checkpoint written before the clock existed resumes with the
    counter derived once from what it holds (post-hoc EMA counters, the EDM2 schedule's images per
    step, or the module's batch size under the current layout, in that order).
    """

    def __init__(self) -> None:
        self.nimg, self.step, self.pending, self.images_per_step = 0, 0, 0, 0
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        return "ImageClock"

    @staticmethod
    def find(trainer: pl.Trainer) -> "ImageClock | None":
        return next((c for c in trainer.callbacks if isinstance(c, ImageClock)), None)

    @staticmethod
    def attach(trainer: pl.Trainer) -> "ImageClock":
        """The trainer's clock, inserted before the checkpoint callbacks if it has none yet."""
        clock = ImageClock.find(trainer)
        if clock is None:
            clock = ImageClock()
            callbacks = trainer.callbacks
            first_checkpoint = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
            callbacks.insert(first_checkpoint, clock)  # after the caller: a running hook loop still reaches it
        clock._trainer = trainer
        return clock

    def __getstate__(self) -> dict[str, Any]:  # pickles for ddp_spawn without the trainer
        return {**self.__dict__, "_trainer": None}

    # ------------------------------------------------------------------ counting
    def settle(self, trainer: pl.Trainer, step: int | None = None) -> int:
        """Credit the images of finished optimizer steps; return images seen after ``trainer.global_step``.

        ``step``: the step just taken when Lightning has not counted it yet (inside ``optimizer_step``).
        """
        step = trainer.global_step if step is None else step
        if step > self.step:
            if self.pending:
                if step == self.step + 1:
                    self.images_per_step = self.pending
                self.nimg += self.pending
            else:  # steps no micro-batch was counted for (the clock attached late): the last known rate
                self.nimg += (step - self.step) * self.images_per_step
            self.step, self.pending = step, 0
        return self.nimg

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.settle(trainer)
        self.pending += batch_images(pl_module, batch) * trainer.world_size

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.settle(trainer)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, int]:
        if self._trainer is not None:
            self.settle(self._trainer)
        return {"nimg": self.nimg, "step": self.step, "pending": self.pending,
                "images_per_step": self.images_per_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.nimg, self.step = int(state["nimg"]), int(state["step"])
        self.pending, self.images_per_step = int(state["pending"]), int(state["images_per_step"])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.state_key in checkpoint.get("callbacks", {}):
            return  # load_state_dict restores it
        step = int(checkpoint.get("global_step", 0))
        rate, source = _legacy_rate(trainer, pl_module, checkpoint)
        ema = checkpoint.get("callbacks", {}).get("PostHocEMA")
        base_step, base_nimg = (int(ema["last_step"]), int(ema["last_nimg"])) if ema else (0, 0)
        self.nimg, self.step, self.pending = base_nimg + (step - base_step) * rate, step, 0
        self.images_per_step = rate
        rank_zero_info(f"ImageClock: the checkpoint predates the image counter; derived {self.nimg} images "
                       f"seen after step {step} from {source}.")


def _legacy_rate(trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> tuple[int, str]:
    """Images per optimizer step of a checkpoint without clock state, and where it was read."""
    ema = checkpoint.get("callbacks", {}).get("PostHocEMA")
    if ema and int(ema["last_step"]) > 0:
        return int(ema["last_nimg"]) // int(ema["last_step"]), "the PostHocEMA state"
    for scheduler in checkpoint.get("lr_schedulers") or []:
        if scheduler.get("batch_size"):
            return int(scheduler["batch_size"]), "the EDM2 learning-rate schedule"
    per_device = int((checkpoint.get("diffusion") or {}).get("batch_size_per_device") or 0)
    per_device = per_device or int(getattr(trainer.datamodule, "batch_size", 0) or 0)
    return per_device * trainer.world_size * trainer.accumulate_grad_batches, "the batch size under this run's layout"


def images_seen(trainer: pl.Trainer) -> int:
    """Images seen globally after ``trainer.global_step`` optimizer steps (the trainer's :class:`ImageClock`)."""
    clock = ImageClock.find(trainer)
    if clock is None:
        raise RuntimeError("images_seen needs an ImageClock among the trainer's callbacks: add "
                           "lightning_diffusion.clock.ImageClock() to Trainer(callbacks=[...]) (the library's "
                           "callbacks and DiffusionLightningModule attach one in setup).")
    return clock.settle(trainer)


def images_per_step(trainer: pl.Trainer) -> int:
    """Images one optimizer step of this run's layout consumes over all ranks (before any step is measured).

    The DataModule's ``batch_size`` (else the module's ``batch_size_per_device``) times world size and
    accumulation. Once steps ran, the clock's ``images_per_step`` is the measured value.
    """
    size = getattr(trainer.datamodule, "batch_size", None)
    size = size or getattr(trainer.lightning_module, "batch_size_per_device", None)
    if not size:
        raise RuntimeError("images_per_step needs the per-device batch size before the first step: give the "
                           "DataModule a batch_size attribute.")
    return int(size) * trainer.world_size * trainer.accumulate_grad_batches
