"""Once per optimizer step: the one piece every callback that acts per step uses.

Lightning calls ``on_train_batch_end`` once per micro-batch; with gradient accumulation only the
last micro-batch of a window finishes an optimizer step (``trainer.global_step`` moves). The gate
remembers the step it last saw; it starts from ``trainer.global_step`` at fit start, so a resumed
run acts at its first new step and never twice on the restored one.
"""

from __future__ import annotations

import lightning.pytorch as pl

__all__ = ["OptimizerStepGate"]


class OptimizerStepGate:
    """``gate.passed(trainer)`` is True once for each new optimizer step.

    Example::

        def on_train_start(self, trainer, pl_module):
            self.gate.start(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not self.gate.passed(trainer):
                return  # a micro-batch of gradient accumulation
    """

    def __init__(self) -> None:
        self.last_step = -1

    def start(self, trainer: pl.Trainer) -> None:
        self.last_step = trainer.global_step

    def passed(self, trainer: pl.Trainer) -> bool:
        if trainer.global_step == self.last_step:
            return False
        self.last_step = trainer.global_step
        return True
