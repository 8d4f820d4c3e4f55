"""EDM2 learning-rate schedule, counted in images (docs/algorithms.md 3.3), and resuming with new optimizer settings.

``lr(nimg) = a_ref / sqrt(max(nimg / ref_images, 1)) * min(nimg / rampup_images, 1)``: constant
after a linear ramp, then inverse square root decay once ``ref_images`` (EDM2: ``t_ref * batch``,
70k steps of 2048 images) have been seen. ``a_ref`` is the optimizer's own ``lr``, so YAML sets it
in one place; the paper pairs it with ``Adam(betas=(0.9, 0.99))`` and no weight decay.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["edm2_lr_factor", "EDM2LRScheduler", "clock_schedulers", "group_settings", "reapply_settings"]


def edm2_lr_factor(nimg: float, ref_images: float, rampup_images: float) -> float:
    """``lr / a_ref`` after ``nimg`` images (3.3); ``ref_images = 0`` / ``rampup_images = 0`` turn a part off."""
    factor = 1.0
    if ref_images > 0:
        factor /= math.sqrt(max(nimg / ref_images, 1.0))
    if rampup_images > 0:
        factor *= min(nimg / rampup_images, 1.0)
    return factor


class EDM2LRScheduler(LRScheduler):
    """Per-step scheduler giving each param group ``base_lr * edm2_lr_factor(nimg, ...)``.

    Args:
        optimizer: the optimizer; its ``lr`` is ``a_ref``.
        batch_size: images per optimizer step over all ranks
            (``per-device batch * devices * nodes * accumulate_grad_batches``): the step count is
            converted to the library's clock with it. ``None`` (the default): inside a
            ``DiffusionLightningModule`` it is read from the trainer
            (:func:`lightning_diffusion.clock.images_per_step`) when the optimizers are configured,
            so changing devices, nodes or accumulation needs no edit; standalone, call
            :meth:`set_batch_size` before the first ``step()``.
        ref_images: images after which the rate decays as ``1/sqrt(nimg / ref_images)``
            (0: no decay).
        rampup_images: images of the initial linear ramp from 0 (0: no ramp).

    The rate of an optimizer step uses the images seen once that step is taken (``images_done +
    batch_size``), so the first step does not have a zero learning rate. ``images_done`` is a
    counter in the scheduler's state, advanced by ``batch_size`` at each ``step()``; inside a
    ``DiffusionLightningModule`` it follows the library's image clock instead
    (:meth:`follow`), so a run resumed on another layout keeps the true count (docs/algorithms.md 0).

    Example (YAML, under ``model.init_args``)::

        optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.01, betas: [0.9, 0.99]}}
        lr_scheduler:
          class_path: lightning_diffusion.optim.EDM2LRScheduler
          init_args: {ref_images: 256000, rampup_images: 12800}
    """

    def __init__(self, optimizer: Optimizer, batch_size: int | None = None, ref_images: float = 70_000 * 2048,
                 rampup_images: float = 10_000_000, last_epoch: int = -1) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"EDM2LRScheduler.batch_size={batch_size} must be >= 1 (images per optimizer step).")
        if ref_images < 0 or rampup_images < 0:
            raise ValueError(
                f"EDM2LRScheduler.ref_images={ref_images} and rampup_images={rampup_images} must be >= 0."
            )
        self.batch_size, self.ref_images, self.rampup_images = batch_size, ref_images, rampup_images
        self.follow_trainer = False  # True once a DiffusionLightningModule set batch_size from its trainer
        self.images_done = 0  # images seen by the steps taken so far (the counter the rate reads)
        self._following = False  # this fit's clock sets images_done (not saved: see state_dict)
        self._constructed = False
        super().__init__(optimizer, last_epoch)
        self._constructed = True

    def set_batch_size(self, batch_size: int) -> None:
        """Fix the images per optimizer step and re-apply the current step's rate to the optimizer."""
        if batch_size < 1:
            raise ValueError(f"EDM2LRScheduler.batch_size={batch_size} must be >= 1 (images per optimizer step).")
        self.batch_size = int(batch_size)
        rates = self.get_lr()
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self._last_lr = rates

    @property
    def wants_image_clock(self) -> bool:
        """True without a ``batch_size``: a ``DiffusionLightningModule`` then attaches its image clock."""
        return self.batch_size is None

    def attach_image_clock(self, images_per_step: int) -> None:
        """Follow the trainer's image clock (kept in the state: re-read on resume) from ``images_per_step``."""
        self.follow_trainer = True
        self.set_batch_size(images_per_step)

    def follow(self, images_done: int, batch_size: int) -> None:
        """Read the images seen from the image clock (called once per optimizer step, before ``step()``)."""
        self.images_done, self.batch_size, self._following = int(images_done), int(batch_size), True

    def step(self, epoch: int | None = None) -> None:
        if self._constructed and not self._following and self.batch_size is not None:
            self.images_done += self.batch_size  # standalone: the scheduler counts for itself
        super().step(epoch)

    def factor(self, step: int) -> float:
        """``lr / a_ref`` of optimizer step ``step`` (0-based) at a constant ``batch_size``."""
        return edm2_lr_factor((step + 1) * self._batch(), self.ref_images, self.rampup_images)

    def _batch(self) -> int:
        if self.batch_size is None:
            raise RuntimeError("EDM2LRScheduler.batch_size is unset: give it, train inside a "
                               "DiffusionLightningModule (which sets it from the trainer), or call set_batch_size().")
        return self.batch_size

    def get_lr(self) -> list[float]:
        if self.batch_size is None and not self._constructed:  # the constructor's step: rates untouched
            return [group["lr"] for group in self.optimizer.param_groups]
        factor = edm2_lr_factor(self.images_done + self._batch(), self.ref_images, self.rampup_images)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "_following"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "images_done" not in state:  # saved before the counter: its steps were all of batch_size images
            state["images_done"] = max(int(state.get("last_epoch", 0)), 0) * int(state.get("batch_size") or 0)
        super().load_state_dict(state)


def clock_schedulers(configs: list[Any]) -> list[Any]:
    """The schedulers among Lightning's scheduler configs that follow the image clock (``follow_trainer``)."""
    return [c.scheduler for c in configs if getattr(c.scheduler, "follow_trainer", False)]


def group_settings(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The numeric settings of each param group (lr, betas, eps, weight_decay, momentum, ...), as built.

    Flags (amsgrad, nesterov, foreach, ...) are left out: they shape the optimizer state, which a
    resume restores, so they are not changed on resume.
    """
    def numeric(value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return all(numeric(v) for v in value)
        return isinstance(value, (int, float, Tensor)) and not isinstance(value, bool)

    return [{k: (list(v) if isinstance(v, tuple) else float(v) if isinstance(v, Tensor) else v)
             for k, v in group.items() if k not in ("params", "initial_lr") and numeric(v)}
            for group in optimizer.param_groups]


def reapply_settings(optimizer: Optimizer, settings: list[dict[str, Any]], schedulers: list[Any]) -> list[str]:
    """After a resume restored ``optimizer``, put back this run's ``settings`` (:func:`group_settings`) where they differ.

    ``optimizer.load_state_dict`` restores every param-group setting from the checkpoint, so a run
    resumed with a lower learning rate would silently train on with the old one. The learning rate
    is compared with the restored *base* rate (``initial_lr``, set by schedulers, else ``lr``); when
    it changed, each scheduler's ``base_lrs`` becomes the new rate and the current rate is scaled by
    new / old: exactly the rate a run started with the new base would have now for schedules
    proportional to the base rate (EDM2LRScheduler, LambdaLR, StepLR, ExponentialLR, LinearLR, ...).
    A scheduler without base rates (ReduceLROnPlateau) owns the rate: it stays, and the note says so.

    Returns one note per change (empty when the settings match).
    """
    notes = []
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, settings)):
        for key, value in wanted.items():
            current = group.get(key)
            plain = list(current) if isinstance(current, tuple) else current
            if key == "lr" or isinstance(current, Tensor) or plain == value:
                continue
            group[key] = tuple(value) if isinstance(current, tuple) else value
            notes.append(f"{key} {current!r} -> {value!r}")
        if "lr" not in wanted:
            continue
        new, old = float(wanted["lr"]), float(group.get("initial_lr", group["lr"]))
        if new == old:
            continue
        if any(not hasattr(s, "base_lrs") for s in schedulers):
            notes.append(f"lr stays {old!r} (the checkpoint's): {type(schedulers[0]).__name__} owns the rate, "
                         f"{new!r} is not applied")
            continue
        rate = float(group["lr"]) * new / old if old else new
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
        if "initial_lr" in group:
            group["initial_lr"] = new
        for scheduler in schedulers:
            scheduler.base_lrs[index] = new
            if getattr(scheduler, "_last_lr", None):
                scheduler._last_lr[index] = rate
        notes.append(f"lr {old!r} -> {new!r} (base rate; the current rate follows)")
    return notes
