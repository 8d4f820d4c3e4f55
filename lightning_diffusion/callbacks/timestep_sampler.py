"""The base of the sampler callbacks: install a learned sampler into any module and check its use.

A sampler callback wraps ``pl_module.timesteps`` in its :class:`~lightning_diffusion.timesteps.LearnedSampler`
at setup (once; the module's checkpoint and the callback's own state both hold the sampler's state),
and during the first micro-batches checks what the module did with the draws: the levels it
reports must be the ones the sampler drew, and the importance weights must reach the loss. A new
sampler subclasses this and implements :meth:`build`; it names no other callback.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..protocol import require, require_outputs
from ..timesteps import InverseCDFDistribution, LearnedSampler

__all__ = ["TimestepSamplerCallback", "evaluation_mode"]

_CHECKED_BATCHES = 3  # micro-batches whose levels are compared with the draw (one host sync each)


class TimestepSamplerCallback(pl.Callback):
    """Installs :meth:`build` ``(module.timesteps)`` as the module's timestep distribution.

    Reads from the module (docs/callbacks.md): ``timesteps`` and the ``training_step`` outputs
    ``level``, ``per_sample_loss`` and ``importance_weight``.
    """

    def __init__(self) -> None:
        self.sampler: LearnedSampler | None = None
        self._checks_left = _CHECKED_BATCHES

    @property
    def name(self) -> str:
        return type(self).__name__

    def build(self, base: InverseCDFDistribution) -> LearnedSampler:
        """The learned sampler wrapped around the module's current density."""
        raise NotImplementedError

    # ------------------------------------------------------------------ installation
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require(pl_module, self.name, "timesteps")
        current = pl_module.timesteps
        if self.sampler is not None and current is self.sampler:
            return  # installed by an earlier stage of this trainer
        if current.chooses_levels:
            raise ValueError(f"{self.name} cannot wrap {type(current).__name__}: both choose the training "
                             f"levels; keep one sampler callback.")
        if not isinstance(current, InverseCDFDistribution):
            raise ValueError(f"{self.name} needs module.timesteps to be a density with an inverse CDF "
                             f"(UniformTimesteps, LogNormalSigma, ...); got {type(current).__name__}.")
        self.sampler = self.build(current)
        pl_module.timesteps = self.sampler

    def sampler_state(self) -> dict[str, Any]:
        return self.sampler.state_dict() if self.sampler is not None else {}

    def load_sampler_state(self, state: dict[str, Any] | None) -> None:
        if state and self.sampler is not None:
            self.sampler.load_state_dict(state)  # the same state a DiffusionLightningModule restored, if any

    # ------------------------------------------------------------------ half-right integrations
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checks_left = _CHECKED_BATCHES

    def check_outputs(self, outputs: Any) -> dict[str, Tensor]:
        """The step's outputs; during the first micro-batches, also that they used this sampler's draw."""
        outputs = require_outputs(outputs, self.name, "level", "per_sample_loss", "importance_weight")
        if self._checks_left <= 0:
            return outputs
        self._checks_left -= 1
        sampler = self.sampler
        assert sampler is not None
        drawn = sampler.last_level
        if drawn is None:
            raise ValueError(f"{self.name}: training_step did not draw its levels from module.timesteps "
                             f"(module.timesteps.sample(...) was never called); the sampler would not be used.")
        level = outputs["level"]
        if level.shape != drawn.shape or not torch.allclose(level.double(), drawn.double().to(level.device)):
            raise ValueError(f"{self.name}: the levels training_step returned are not the ones module.timesteps "
                             f"drew for this batch; draw them with module.timesteps.sample(...) and return those.")
        self.check_loss(outputs)
        return outputs

    def check_loss(self, outputs: dict[str, Tensor]) -> None:
        """Called with the checked outputs: a sampler whose weights are not all 1 checks they reach the loss."""


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside; each one's own mode restored after (a frozen part stays frozen)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
