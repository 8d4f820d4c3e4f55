"""LossAwareTimestepSampling: improved-diffusion's loss-aware importance sampler as a callback.

A thin adapter over :class:`~lightning_diffusion.timesteps.LossAwareTimesteps` (ALGORITHMS.md 4):
it wraps the module's timestep distribution and feeds it every rank's per-sample losses once per
optimizer step. The math lives in ``timesteps/importance.py``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..timesteps import AdaptiveTimesteps, LossAwareTimesteps
from .collectives import all_gather_cat, all_reduce_max_int, world_size
from .sampler_install import install_sampler
from .sampler_report import log_levels

__all__ = ["LossAwareTimestepSampling"]


class LossAwareTimestepSampling(pl.Callback):
    """Sample timesteps (or sigma bins) in proportion to the RMS of their recent losses.

    Args:
        history: losses kept per timestep / bin; sampling stays as the base density's until every
            bin in range holds this many.
        uniform_prob: mass of the base density mixed in (keeps every level reachable).
        num_bins: sigma processes only: bins of the log-sigma grid.
        log_distribution_every: every this many optimizer steps, log where the sampler puts its
            mass (``loss_aware/mass_q0..3`` over base-CDF quarters, ``loss_aware/warm``,
            ``loss_aware/max_weight``, level quantiles, a TensorBoard histogram); default: the
            trainer's ``log_every_n_steps``; 0 turns it off.

    The module's loss becomes ``mean(w * per_sample_loss)`` with ``w = q_b / p_b`` (``1/(T p_t)``),
    an unbiased estimate of the original objective. The losses of every rank are all-gathered
    (padded to a fixed size, so unequal per-rank batches need no host sync), so every rank holds the
    same history and the same distribution; the draws differ per rank. The history is checkpointed
    with the module (``checkpoint["diffusion"]["timesteps"]``). Composes with ``TimestepCurriculum``
    (``restrict``) and any weighting; not with ``AdaptiveTimestepSampling`` (both choose t).

    Example::

        trainer = pl.Trainer(callbacks=[LossAwareTimestepSampling(history=10, uniform_prob=1e-3)])
    """

    def __init__(self, history: int = 10, uniform_prob: float = 1e-3, num_bins: int = 64,
                 log_distribution_every: int | None = None) -> None:
        if history < 1:
            raise ValueError(f"LossAwareTimestepSampling.history={history} must be >= 1.")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"LossAwareTimestepSampling.uniform_prob={uniform_prob} must be in [0, 1].")
        if num_bins < 2:
            raise ValueError(f"LossAwareTimestepSampling.num_bins={num_bins} must be >= 2.")
        if log_distribution_every is not None and log_distribution_every < 0:
            raise ValueError(f"LossAwareTimestepSampling.log_distribution_every={log_distribution_every} must be >= 0.")
        self.history, self.uniform_prob, self.num_bins = history, uniform_prob, num_bins
        self.log_distribution_every = log_distribution_every
        self.sampler: LossAwareTimesteps | None = None
        self._bins: list[Tensor] = []
        self._losses: list[Tensor] = []
        self._last_step = 0
        self._capacity = 0

    @property
    def state_key(self) -> str:
        return "LossAwareTimestepSampling"

    # ------------------------------------------------------------------ installation
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.sampler = install_sampler(
            pl_module, "LossAwareTimestepSampling", LossAwareTimesteps, AdaptiveTimesteps, "AdaptiveTimestepSampling",
            lambda current: LossAwareTimesteps(current, self.history, self.uniform_prob, self.num_bins))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._bins, self._losses = [], []

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.sampler is not None
        if not isinstance(outputs, dict) or "level" not in outputs or "per_sample_loss" not in outputs:
            raise RuntimeError("LossAwareTimestepSampling needs training_step to return `level` and "
                               "`per_sample_loss` (DiffusionLightningModule does).")
        self._bins.append(self.sampler.bin_of(outputs["level"]))
        self._losses.append(outputs["per_sample_loss"].float())
        if trainer.global_step == self._last_step:  # a micro-batch of gradient accumulation: no step yet
            return
        self._last_step = trainer.global_step
        bins, losses = torch.cat(self._bins), torch.cat(self._losses)
        self._bins, self._losses = [], []
        if world_size() > 1:
            bins, losses = self._gather(trainer, pl_module, bins, losses)
        self.sampler.update_bins(bins, losses)
        every = trainer.log_every_n_steps if self.log_distribution_every is None else self.log_distribution_every
        if every and trainer.global_step % every == 0:
            self._log(trainer, pl_module)

    def _gather(self, trainer: pl.Trainer, pl_module: pl.LightningModule, bins: Tensor,
                losses: Tensor) -> tuple[Tensor, Tensor]:
        """Every rank's (bin, loss) pairs, padded to one fixed size agreed once (then no host sync)."""
        if not self._capacity:
            per_step = int(getattr(pl_module, "batch_size_per_device", 0) or 0) * trainer.accumulate_grad_batches
            self._capacity = all_reduce_max_int(max(len(bins), per_step), bins.device)
        cap = self._capacity
        n = min(len(bins), cap)  # a step larger than any seen at the start keeps its latest losses
        packed = torch.zeros(2, cap, device=bins.device)
        packed[0] = float(self.sampler.num_bins)  # the ignored sink bin marks padding
        packed[0, :n] = bins[-n:].float()  # bin indices < 2^24: exact in float32
        packed[1, :n] = losses[-n:]
        gathered = all_gather_cat(packed.unsqueeze(0))
        return gathered[:, 0].flatten().long(), gathered[:, 1].flatten()

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = self.sampler
        for k, mass in enumerate(sampler.mass_by_quantile(4)):
            pl_module.log(f"loss_aware/mass_q{k}", mass.float())
        pl_module.log("loss_aware/warm", sampler.warm.float())
        pl_module.log("loss_aware/max_weight", sampler.weights.max())
        # A fixed, separate stream: looking never changes the training draws.
        generator = torch.Generator(device=sampler.p.device).manual_seed(0)
        levels, _ = sampler.sample(4096, sampler.p.device, generator)
        log_levels(trainer, pl_module, "loss_aware", levels, sampler.discrete)
