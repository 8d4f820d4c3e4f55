"""LossAwareTimestepSampling: improved-diffusion's loss-aware importance sampler as a callback.

A thin adapter over :class:`~lightning_diffusion.timesteps.LossAwareTimesteps` (docs/algorithms.md 4):
it wraps the module's timestep distribution and feeds it every rank's per-sample losses once per
optimizer step. The math lives in ``timesteps/importance.py``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..timesteps import InverseCDFDistribution, LossAwareTimesteps
from .collectives import all_gather_cat, all_reduce_max_int, world_size
from .sampler_report import log_levels
from .steps import OptimizerStepGate
from .timestep_sampler import TimestepSamplerCallback

__all__ = ["LossAwareTimestepSampling"]

_WEIGHT_CHECKS = 2  # steps with non-uniform weights on which their use in the loss is checked
_WEIGHT_CHECK_EVERY = 10  # optimizer steps between those checks (each reads one value on the host)


class LossAwareTimestepSampling(TimestepSamplerCallback):
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

    Reads from the module (docs/callbacks.md): ``timesteps``; ``training_step`` returns ``level``,
    ``per_sample_loss`` and ``importance_weight``, and its loss is ``mean(w * per_sample_loss)``
    with ``w = q_b / p_b`` (``1/(T p_t)``), an unbiased estimate of the original objective. The
    losses of every rank are all-gathered (padded to a fixed size, so unequal per-rank batches need
    no host sync), so every rank holds the same history and the same distribution; the draws differ
    per rank. The history is checkpointed
    in this callback's state (and by ``DiffusionLightningModule`` with its timesteps). Composes with
    ``TimestepCurriculum`` (``restrict``) and any weighting; not with another sampler that chooses
    the levels. During the first steps it checks that the module trains on its draws and applies
    its weights (one sentence if not).

    Example::

        trainer = pl.Trainer(callbacks=[LossAwareTimestepSampling(history=10, uniform_prob=1e-3)])
    """

    def __init__(self, history: int = 10, uniform_prob: float = 1e-3, num_bins: int = 64,
                 log_distribution_every: int | None = None) -> None:
        super().__init__()
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
        self.gate = OptimizerStepGate()
        self._bins: list[Tensor] = []
        self._losses: list[Tensor] = []
        self._capacity = 0
        self._weight_checks_left = _WEIGHT_CHECKS

    @property
    def state_key(self) -> str:
        return "LossAwareTimestepSampling"

    def build(self, base: InverseCDFDistribution) -> LossAwareTimesteps:
        return LossAwareTimesteps(base, self.history, self.uniform_prob, self.num_bins)

    def state_dict(self) -> dict[str, Any]:
        return {"timesteps": self.sampler_state()}  # a module that does not checkpoint its timesteps keeps them too

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_sampler_state(state_dict.get("timesteps"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.gate.start(trainer)
        self._bins, self._losses = [], []
        self._weight_checks_left = _WEIGHT_CHECKS

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self.sampler is not None
        outputs = self.check_outputs(outputs)
        self._bins.append(self.sampler.bin_of(outputs["level"]))
        self._losses.append(outputs["per_sample_loss"].float())
        if not self.gate.passed(trainer):  # a micro-batch of gradient accumulation: no step yet
            return
        if self._weight_checks_left and trainer.global_step % _WEIGHT_CHECK_EVERY == 0:
            self._check_weights_reach_the_loss(outputs)
        bins, losses = torch.cat(self._bins), torch.cat(self._losses)
        self._bins, self._losses = [], []
        if world_size() > 1:
            bins, losses = self._gather(trainer, pl_module, bins, losses)
        self.sampler.update_bins(bins, losses)
        every = trainer.log_every_n_steps if self.log_distribution_every is None else self.log_distribution_every
        if every and trainer.global_step % every == 0:
            self._log(trainer, pl_module)

    def _check_weights_reach_the_loss(self, outputs: dict[str, Tensor]) -> None:
        """Once the weights are not all 1: the returned ones must be the drawn ones, and a loss equal to
        the plain mean of the per-sample losses (not the weighted one) means they were dropped."""
        weight = outputs["importance_weight"].detach().float()
        if float((weight - 1).abs().max()) < 1e-6:  # one host read, every few steps until checked
            return
        self._weight_checks_left -= 1
        drawn = self.sampler.last_weight
        if drawn is None or drawn.shape != weight.shape or not torch.allclose(weight, drawn.float().to(weight.device)):
            raise ValueError("LossAwareTimestepSampling: the importance_weight training_step returned is not the "
                             "one module.timesteps.sample(...) drew with the levels; return that weight.")
        per_sample, loss = outputs["per_sample_loss"].float(), outputs["loss"].detach().float()
        plain, weighted = per_sample.mean(), (per_sample * weight).mean()
        if _close(loss, plain) and not _close(loss, weighted):
            raise ValueError("LossAwareTimestepSampling: training_step's loss is the plain mean of the per-sample "
                             "losses; the importance weights must be applied, loss = (importance_weight * "
                             "per_sample_loss).mean(), or the sampler biases the objective.")

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
        record = sampler.last_level, sampler.last_weight
        levels, _ = sampler.sample(4096, sampler.p.device, generator)
        sampler.last_level, sampler.last_weight = record  # the training draw stays the one checked
        log_levels(trainer, pl_module, "loss_aware", levels, sampler.discrete)


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.isclose(a, b, rtol=1e-4, atol=1e-8))
