"""LastCheckpoint: ``last.ckpt`` at the end of every fit and on a step or time interval, independent of validation.

Lightning's default ``ModelCheckpoint`` saves only after validation: a short fit leaves nothing to
``validate`` or resume, and a crash just before the first validation loses the whole run. This
callback keeps one file, ``<checkpoint dir>/last.ckpt``, always the newest state: written every
``every_n_steps`` optimizer steps and/or every ``every_minutes`` of training, when the fit ends
(``max_steps``, ``max_epochs``, ``max_time``, early stopping), and when it stops on a signal through
:class:`PreemptionCheckpoint` (SIGUSR1, SIGTERM, Ctrl-C). Each write replaces the previous file
atomically (temp file + rename), so a crash mid-write keeps the previous ``last.ckpt``.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..io import remove_stale_temps, replace_path, temp_path
from .steps import OptimizerStepGate

__all__ = ["LastCheckpoint", "checkpoint_folder"]


def checkpoint_folder(trainer: pl.Trainer, dirpath: str | None = None) -> str:
    """``dirpath``, else the first ``ModelCheckpoint``'s folder, else ``<log_dir>/checkpoints``."""
    if dirpath:
        return dirpath
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    if checkpoint is not None and checkpoint.dirpath:
        return str(checkpoint.dirpath)
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")


class LastCheckpoint(Checkpoint):
    """Keep ``last.ckpt`` up to date: periodically, at the end of every fit, and on preemption.

    Args:
        every_n_steps: also save every this many optimizer steps (``None``: no step interval).
        every_minutes: also save once this many minutes of training passed since the last save
            (``None``: no time interval). Under DDP global rank 0's clock decides, read every
            ``check_every_n_steps`` steps (one tiny broadcast then; a single process reads its
            clock every step, no collective).
        dirpath: folder (default: the ``ModelCheckpoint``'s, else ``<log_dir>/checkpoints``).
        check_every_n_steps: see ``every_minutes``.

    A ``Checkpoint`` subclass, so Lightning runs it after every other callback at each hook: the
    file holds the callbacks' state of the same step (post-hoc EMA, samplers, curriculum). Lightning
    adds its default ``ModelCheckpoint`` only when no ``Checkpoint`` is given: from Python, add
    ``ModelCheckpoint()`` beside this one if you want the after-validation files too (the CLI does).

    Example::

        trainer = pl.Trainer(callbacks=[ModelCheckpoint(), LastCheckpoint(every_n_steps=1000)])
        # .../checkpoints/last.ckpt after every 1000 steps and at the end; resume with ckpt_path=
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_steps: int | None = None, every_minutes: float | None = 30.0,
                 dirpath: str | None = None, check_every_n_steps: int = 10) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"LastCheckpoint.every_n_steps={every_n_steps} must be >= 1 or None.")
        if every_minutes is not None and not every_minutes > 0:
            raise ValueError(f"LastCheckpoint.every_minutes={every_minutes} must be > 0 or None.")
        if check_every_n_steps < 1:
            raise ValueError(f"LastCheckpoint.check_every_n_steps={check_every_n_steps} must be >= 1.")
        self.every_n_steps, self.every_minutes, self.dirpath = every_n_steps, every_minutes, dirpath
        self.check_every_n_steps = check_every_n_steps
        self.saved_step = -1  # global step of the newest save (of this process)
        self._since = time.monotonic()
        self.gate = OptimizerStepGate()
        self._last_checkpoint_saved = ""  # the name Lightning's ModelCheckpoint uses (divergence message reads it)

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def path(self, trainer: pl.Trainer) -> str:
        return os.path.join(checkpoint_folder(trainer, self.dirpath), self.FILENAME)

    def save(self, trainer: pl.Trainer) -> str:
        """Write ``last.ckpt`` of the current step (every rank calls; global rank 0 writes), atomically."""
        path = self.path(trainer)
        local = "://" not in path
        target = str(temp_path(path)) if local else path  # replaced onto path below
        if local and trainer.is_global_zero:
            remove_stale_temps(os.path.dirname(path))  # e.g. a sharded save's folder left by a killed run
        trainer.save_checkpoint(target, weights_only=False)
        if local and trainer.is_global_zero:
            replace_path(target, path)  # a file, or a folder under FSDP2's sharded checkpoints
        trainer.strategy.barrier("LastCheckpoint.save")
        return self._saved(trainer, path)

    def _saved(self, trainer: pl.Trainer, path: str) -> str:
        self.saved_step, self._since, self._last_checkpoint_saved = trainer.global_step, time.monotonic(), path
        return path

    def _link(self, trainer: pl.Trainer, source: str) -> bool:
        """Make ``last.ckpt`` a hard link of ``source`` (a checkpoint of this very step): no second write.
        A sharded checkpoint folder becomes a folder of hard links."""
        path = self.path(trainer)
        ok = True
        if trainer.is_global_zero:
            tmp = temp_path(path)
            try:
                if os.path.isdir(source):
                    shutil.copytree(source, tmp, copy_function=os.link)
                else:
                    os.link(source, tmp)
                replace_path(tmp, path)
            except OSError:  # no hard links here (another file system, remote storage): save instead
                if os.path.isdir(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
                ok = False
        if not bool(trainer.strategy.broadcast(ok)):
            return False
        self._saved(trainer, path)
        return True

    @property
    def last_model_path(self) -> str:
        """The newest ``last.ckpt`` written. (Lightning's ``ckpt_path="last"`` looks for ``last.ckpt`` in the
        ``ModelCheckpoint`` folders: it finds this file when both share a folder, as under the CLI.)"""
        return self._last_checkpoint_saved

    def _time_is_up(self, trainer: pl.Trainer, step: int) -> bool:
        if self.every_minutes is None:
            return False
        if trainer.world_size > 1:
            if step % self.check_every_n_steps:
                return False  # the same on every rank: no collective on this step
            return bool(trainer.strategy.broadcast(time.monotonic() - self._since >= 60 * self.every_minutes))
        return time.monotonic() - self._since >= 60 * self.every_minutes

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.monotonic()
        self.gate.start(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.gate.passed(trainer):
            return  # a micro-batch of gradient accumulation: no optimizer step
        step = trainer.global_step
        by_steps = self.every_n_steps is not None and step % self.every_n_steps == 0
        if self._time_is_up(trainer, step) or by_steps:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.saved_step != trainer.global_step:
            self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # PreemptionCheckpoint raises SIGTERMException right after an optimizer step (a consistent
        # state); any other exception may stop mid-step, and divergence must never be saved.
        if not isinstance(exception, SIGTERMException) or self.saved_step == trainer.global_step:
            return
        preempted = next((c.saved_path for c in trainer.callbacks if getattr(c, "saved_step", None) ==
                          trainer.global_step and getattr(c, "saved_path", "") and c is not self), "")
        if not (preempted and os.path.exists(preempted) and self._link(trainer, preempted)):
            self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"saved_step": self.saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # a resumed fit saves on its own schedule; the file's step is in the checkpoint itself
