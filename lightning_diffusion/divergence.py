"""The divergence guard: stop on a nan/inf loss or weight before a checkpoint of it is written.

The first optimizer step with a non-finite loss is kept in a device tensor (no host sync per
step); :meth:`DivergenceGuard.check` reads it on the steps where Lightning synchronizes anyway
(logging steps, checkpoint saves, validations), so a diverged run stops with one sentence naming
the step and the last good checkpoint, and no checkpoint of non-finite weights exists.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from torch import Tensor

from .core.shards import local

__all__ = ["NonFiniteLossError", "DivergenceGuard"]

_NEVER = 2**62  # "no non-finite step seen" in the on-device record of the first bad step


class NonFiniteLossError(RuntimeError):
    """Training diverged (a non-finite loss or weights); raised before a checkpoint of it is written."""


def last_checkpoint(trainer: pl.Trainer) -> str:
    """The newest checkpoint file this run's checkpoint callbacks wrote, or 'none saved yet'."""
    paths = [getattr(cb, "_last_checkpoint_saved", "") for cb in trainer.checkpoint_callbacks]
    paths = [p for p in paths if p and os.path.isfile(p)]
    return repr(str(max(paths, key=os.path.getmtime))) if paths else "none saved yet"


class DivergenceGuard:
    """Records the first optimizer step with a non-finite loss on the device; raises when read.

    Args:
        enabled: ``False`` turns the guard off (``check_finite=false``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.first: Tensor | None = None

    def reset(self) -> None:
        self.first = None

    def record(self, loss: Tensor, step: int, precision: str) -> None:
        """Keep ``step`` if ``loss`` is nan/inf and no earlier step was: tensor ops only, no host sync.

        Under ``16-mixed`` only the weights count (the grad scaler skips inf steps by design).
        """
        if not self.enabled or precision == "16-mixed":
            return
        if self.first is None or self.first.device != loss.device:
            self.first = torch.full((), _NEVER, dtype=torch.long, device=loss.device)
        bad = (~torch.isfinite(loss.detach())).long()
        torch.minimum(self.first, _NEVER - bad * (_NEVER - step), out=self.first)

    def check(self, module: pl.LightningModule, weights: bool) -> None:
        """Raise :class:`NonFiniteLossError` if a loss (or, with ``weights``, a weight) is nan/inf.

        One host sync; under DDP one all-reduce (min), reached by every rank at the same step (logging
        steps, checkpoint saves and validations are the same on every rank), so all ranks stop.
        """
        if not self.enabled or module._trainer is None:
            return
        trainer = module.trainer
        first = self.first if self.first is not None else torch.full((), _NEVER, dtype=torch.long,
                                                                     device=module.device)
        if weights:
            finite = torch.stack([local(p).detach().isfinite().all() for p in module.parameters()]).all()  # own shard
            now = torch.tensor(trainer.global_step, device=first.device)  # the update that made them
            first = torch.where(finite, first, torch.minimum(first, now))
        if trainer.world_size > 1:
            first = trainer.strategy.reduce(first, reduce_op="min")
        step = int(first.item())
        if step == _NEVER:
            return
        raise NonFiniteLossError(
            f"{type(module).__name__}: the training loss or weights became non-finite (nan/inf) at optimizer "
            f"step {step}, so training stopped without saving it (last good checkpoint: {last_checkpoint(trainer)}); "
            f"use a lower learning rate or gradient clipping (trainer.gradient_clip_val), or check_finite=false "
            f"to train on.")
