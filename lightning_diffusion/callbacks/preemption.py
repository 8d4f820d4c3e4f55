"""PreemptionCheckpoint: on SIGUSR1/SIGTERM, save a checkpoint at the next optimizer step and exit 0.

Lightning alone handles these signals only partly outside SLURM: SIGTERM stops the loop without a
checkpoint, and SIGUSR1 saves and requeues only under SLURM with auto-requeue. This callback makes
both save-and-exit everywhere (a laptop, ``torchrun``, Kubernetes, SLURM).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .last_checkpoint import checkpoint_folder
from .steps import OptimizerStepGate

__all__ = ["PreemptionCheckpoint"]


class PreemptionCheckpoint(Callback):
    """Save ``<checkpoint dir>/preempted-step=N.ckpt`` after the optimizer step a signal arrived in, then exit.

    Ctrl-C (SIGINT) does the same; a second Ctrl-C stops at once without a checkpoint. The
    signal handler only sets a flag; the save happens in ``on_train_batch_end`` once the
    optimizer step has finished, so the checkpoint holds step N exactly and resumes from it
    (``--ckpt_path``). Under DDP the flag is all-reduced (any rank signalled -> every rank stops at
    the same step, rank 0 writes); single-process runs read a Python bool, no collective. The run
    ends with Lightning's ``SIGTERMException`` (a ``SystemExit`` with status 0), as Lightning's own
    SIGTERM handling does. A SIGUSR1 handler already installed (Lightning's SLURM requeue) still
    runs; Lightning's SIGTERM handler is replaced, since it would stop without a checkpoint.

    Args:
        signals: names of the signals that trigger the save.
        check_every_n_steps: under DDP, agree on the flag every n optimizer steps (one tiny all-reduce and
            a host read each time, kept out of most steps; a single process reads its flag every step
            for free).
        dirpath: folder of the checkpoint (default: the ModelCheckpoint's, else ``<log_dir>/checkpoints``).

    Example::

        pl.Trainer(callbacks=[PreemptionCheckpoint()])   # the CLI adds it by default
        # kill -USR1 <pid>  ->  ".../checkpoints/preempted-step=1234.ckpt", exit status 0
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM", "SIGINT"), check_every_n_steps: int = 10,
                 dirpath: str | None = None) -> None:
        for name in signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"PreemptionCheckpoint.signals: {name!r} is not a signal here; "
                                 f"use e.g. SIGUSR1, SIGTERM.")
        if check_every_n_steps < 1:
            raise ValueError(f"PreemptionCheckpoint.check_every_n_steps={check_every_n_steps} must be >= 1.")
        self.signals, self.check_every_n_steps, self.dirpath = tuple(signals), check_every_n_steps, dirpath
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self.gate = OptimizerStepGate()
        self.saved_step, self.saved_path = -1, ""

    @property
    def state_key(self) -> str:
        return "PreemptionCheckpoint"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum)
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:  # pressed twice: stop at once, as Ctrl-C always does
                raise KeyboardInterrupt
            os.write(2, b"\nCtrl-C: saving a checkpoint after this optimizer step (press Ctrl-C again to stop "
                        b"at once, without one)\n")
        elif signum != signal.SIGTERM and callable(previous):
            previous(signum, frame)  # e.g. Lightning's SLURM requeue on SIGUSR1
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning registered its handlers (Trainer._run), so ours wrap or replace them.
        self.received = None
        self.gate.start(trainer)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        every = self.check_every_n_steps if trainer.world_size > 1 else 1
        if not self.gate.passed(trainer) or step % every:
            return  # mid accumulation window, or not a checking step: same on every rank
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = os.path.join(checkpoint_folder(trainer, self.dirpath), f"preempted-step={step}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; global rank 0 writes
        self.saved_step, self.saved_path = step, path  # LastCheckpoint links last.ckpt to it
        rank_zero_info(f"PreemptionCheckpoint: signal received; saved {path} at step {step}; "
                       f"resume with --ckpt_path={path}")
        raise SIGTERMException()  # a SystemExit with status 0, Lightning's own preemption exit
