"""AdaptiveTimestepSampling: a learned, image-conditioned timestep sampler trained online.

A thin adapter (docs/algorithms.md 4): it installs :class:`~lightning_diffusion.timesteps.AdaptiveTimesteps`
into the module and, every ``update_every`` optimizer steps, measures the losses of the current
batch at the subset S and of a probe image on the probe grid just before the optimizer step and
again just after it; the decrease trains the policy (REINFORCE) and re-selects S. ``reward`` picks
what is measured: the weighted training MSE (default) or the variational bound's per-timestep term
(the paper's official choice). The math lives in ``timesteps/adaptive.py``, ``timesteps/lookahead.py``
and ``core/vlb.py``.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import torch
from rich import get_console
from torch import Tensor

from ..core.noise import VPProcess
from ..core.seeds import stream_seed
from ..protocol import require
from ..timesteps import AdaptiveTimesteps, InverseCDFDistribution
from ..timesteps.lookahead import (LookaheadBatch, LookaheadBuffer, LookaheadTerm, TrainingLossTerm, VLBTerm,
                                   evenly_spaced_subset, probe_quantiles)
from .collectives import all_reduce_mean
from .sampler_report import log_levels, subset_table
from .timestep_sampler import TimestepSamplerCallback, evaluation_mode

__all__ = ["AdaptiveTimestepSampling"]

_TABLE_EVERY_S = 60.0  # the Rich table of S is printed at most this often
REWARDS = ("loss", "vlb")
_LOOKAHEAD_SALT = 3  # the look-ahead noise: a stream of its own (core/seeds.py)


class AdaptiveTimestepSampling(TimestepSamplerCallback):
    """Learn pi(t | x0) so that the drawn timesteps are those whose updates lower the loss most.

    Args:
        update_every: look-ahead and policy update every this many optimizer steps.
        subset_size: |S|, the timesteps at which each sample's loss decrease is its reward.
        buffer_size: ring-buffer entries (per-grid-level decreases) that rank the grid for S.
        probe_grid: the probe levels: ``n`` mid-quantiles of the base density, or a list of quantiles in (0, 1).
        probe_images: images of the batch evaluated on the whole grid (the first ones).
        ent_coef: entropy bonus of the REINFORCE loss.
        lr: learning rate of the policy's Adam.
        max_grad_norm: gradient clipping of the policy.
        fresh_noise: draw new noise for the "after" losses (the official code's way) instead of
            reusing the "before" noise (common random numbers, lower variance; the default).
        policy_channels: width of the policy CNN.
        seed: seed of the policy's initial weights and of the look-ahead noise.
        log_distribution_every: every this many optimizer steps log the drawn levels' quantiles (and a
            TensorBoard histogram), the policy's mean Beta and the last reward; default: the
            trainer's ``log_every_n_steps``; 0 turns it off.
        show_subset: print a Rich table of S on global rank 0 when it changes (at most once a minute).
        reward: what "loss" the look-ahead measures, for the per-sample reward and the grid's
            decreases alike. ``"loss"`` (default): the weighted training MSE with the standard target.
            ``"vlb"``: the per-timestep KL term of the DDPM variational bound in bits/dim with the
            posterior variance as the fixed reverse variance (``core/vlb.py``), what the paper's
            official code uses; VPProcess only.

    Reads from the module (docs/callbacks.md): ``timesteps`` (drawn with ``x0`` and ``labels``),
    ``lookahead_loss`` (``reward="loss"``) or ``process`` and ``denoise`` (``reward="vlb"``), and the
    ``training_step`` outputs ``level``, ``per_sample_loss``, ``importance_weight``. The before/after
    losses run without gradients and with every submodule in eval mode (each one's mode restored
    after); the images, labels and ``u'`` are the ones the sampler drew for the micro-batch that
    steps. With gradient accumulation they bracket the real optimizer step once, on the last
    micro-batch. Under DDP the grid decreases are averaged over ranks (so S is identical everywhere)
    and the policy's gradients are averaged before its step (so the policy stays identical); each
    rank draws its own t. The policy, its optimizer, the buffer, S and counters are in this
    callback's state. The update step syncs with the host once (to read S).

    Example::

        trainer = pl.Trainer(callbacks=[AdaptiveTimestepSampling(update_every=40, subset_size=3)])
    """

    def __init__(self, update_every: int = 40, subset_size: int = 3, buffer_size: int = 20,
                 probe_grid: int | Sequence[float] = 20, probe_images: int = 1, ent_coef: float = 1e-2,
                 lr: float = 1e-2, max_grad_norm: float = 1.0, fresh_noise: bool = False, policy_channels: int = 32,
                 seed: int = 0, log_distribution_every: int | None = None, show_subset: bool = True,
                 reward: Literal["loss", "vlb"] = "loss") -> None:
        super().__init__()
        for name, value in (("update_every", update_every), ("subset_size", subset_size),
                            ("probe_images", probe_images), ("policy_channels", policy_channels)):
            if value < 1:
                raise ValueError(f"AdaptiveTimestepSampling.{name}={value} must be >= 1.")
        if ent_coef < 0 or not lr > 0 or not max_grad_norm > 0:
            raise ValueError(f"AdaptiveTimestepSampling needs ent_coef >= 0, lr > 0 and max_grad_norm > 0; got "
                             f"ent_coef={ent_coef}, lr={lr}, max_grad_norm={max_grad_norm}.")
        if log_distribution_every is not None and log_distribution_every < 0:
            raise ValueError(f"AdaptiveTimestepSampling.log_distribution_every={log_distribution_every} must be >= 0.")
        if reward not in REWARDS:
            raise ValueError(f"AdaptiveTimestepSampling.reward={reward!r} is not supported; use 'loss' or 'vlb'.")
        self.quantiles = probe_quantiles(probe_grid)
        if subset_size > len(self.quantiles):
            raise ValueError(f"AdaptiveTimestepSampling.subset_size={subset_size} must be <= the "
                             f"{len(self.quantiles)} probe_grid levels.")
        self.update_every, self.subset_size, self.probe_images = update_every, subset_size, probe_images
        self.ent_coef, self.lr, self.max_grad_norm, self.fresh_noise = ent_coef, lr, max_grad_norm, fresh_noise
        self.policy_channels, self.seed = policy_channels, seed
        self.log_distribution_every, self.show_subset = log_distribution_every, show_subset
        self.reward = reward
        self.term: LookaheadTerm = TrainingLossTerm()
        self.buffer = LookaheadBuffer(len(self.quantiles), buffer_size)
        self.subset: list[int] = evenly_spaced_subset(len(self.quantiles), subset_size).tolist()
        self.updates = 0
        self.sampler: AdaptiveTimesteps | None = None
        self.grid_levels: Tensor | None = None
        self._pending: tuple[Tensor, LookaheadBatch, tuple[Tensor, Tensor], Tensor] | None = None
        self._last_reward: Tensor | None = None
        self._shown: list[int] | None = None
        self._shown_at = float("-inf")

    @property
    def state_key(self) -> str:
        return "AdaptiveTimestepSampling"

    # ------------------------------------------------------------------ installation and state
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.reward == "vlb":
            require(pl_module, "AdaptiveTimestepSampling(reward='vlb')", "process", "denoise")
            process = pl_module.process
            if not isinstance(process, VPProcess):
                raise ValueError(f"AdaptiveTimestepSampling.reward='vlb' needs a VPProcess (the DDPM bound's "
                                 f"per-timestep KL); with {type(process).__name__} use reward='loss'.")
            self.term = VLBTerm(process)
        else:
            require(pl_module, "AdaptiveTimestepSampling", "lookahead_loss")
        super().setup(trainer, pl_module, stage)
        self.grid_levels = self.sampler.base.icdf(self.quantiles)

    def build(self, base: InverseCDFDistribution) -> AdaptiveTimesteps:
        return AdaptiveTimesteps(base, self.lr, self.policy_channels, self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "subset": list(self.subset), "updates": self.updates,
                "reward": self.reward, "timesteps": self.sampler_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("reward", "loss")  # checkpoints from before the option measured the loss
        if saved != self.reward:
            raise ValueError(f"AdaptiveTimestepSampling: the checkpoint's buffer holds reward={saved!r} decreases; "
                             f"resume with reward={saved!r} (got {self.reward!r}).")
        self.buffer.load_state_dict(state_dict["buffer"])
        self.subset = [int(i) for i in state_dict["subset"]]
        self.updates = int(state_dict["updates"])
        self.load_sampler_state(state_dict.get("timesteps"))

    # ------------------------------------------------------------------ before and after the step
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        sampler = self.sampler
        if trainer.global_step % self.update_every or sampler is None or sampler.last_x0 is None:
            return
        x0, u, labels = sampler.last_x0, sampler.last_u, sampler.last_labels  # the draw of the stepping micro-batch
        levels = self.grid_levels.to(x0.device)
        generator = torch.Generator(device=x0.device).manual_seed(self._noise_seed(trainer))
        batch = LookaheadBatch(x0, labels, levels[torch.tensor(self.subset, device=x0.device)], levels,
                               self.probe_images, generator)
        self._pending = (x0, batch, self._losses(trainer, pl_module, batch), u)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        outputs = self.check_outputs(outputs)
        if self._pending is not None:
            self._update(trainer, pl_module)
        every = trainer.log_every_n_steps if self.log_distribution_every is None else self.log_distribution_every
        if every and trainer.global_step % every == 0:
            self._log(trainer, pl_module, outputs["level"])

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        x0, batch, (subset_before, grid_before), u = self._pending
        self._pending = None
        if self.fresh_noise:
            batch.noise = batch.draw_noise()
        subset_after, grid_after = self._losses(trainer, pl_module, batch)
        reward = (subset_before - subset_after).sum(0)  # R(x) = sum_{s in S} (L_s before - L_s after)
        self.buffer.push(all_reduce_mean(grid_before - grid_after))  # identical dL on every rank
        self.sampler.policy_step(x0, u, reward, self.ent_coef, self.max_grad_norm, reduce_grads=all_reduce_mean)
        self.updates += 1
        self._last_reward = reward.mean()
        chosen = self.buffer.select(self.subset_size)
        if chosen is not None:
            self.subset = chosen.tolist()  # the one host sync, every update_every steps
            self._show(trainer)

    def _losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                batch: LookaheadBatch) -> tuple[Tensor, Tensor]:
        with evaluation_mode(pl_module), trainer.precision_plugin.forward_context():
            return batch.losses(pl_module, chunk=2 * batch.batch, term=self.term)

    def _noise_seed(self, trainer: pl.Trainer) -> int:
        # Per (seed, rank, step): resumable, and each rank probes with its own noise.
        return stream_seed(self.seed, trainer.global_rank, trainer.global_step, salt=_LOOKAHEAD_SALT)

    # ------------------------------------------------------------------ observability
    def _show(self, trainer: pl.Trainer) -> None:
        now = time.monotonic()
        if not (self.show_subset and trainer.is_global_zero) or self.subset == self._shown:
            return
        if self.buffer.filled < 3:  # correlations over two entries are all +-1: nothing to show yet
            return
        if now - self._shown_at < _TABLE_EVERY_S:
            return
        self._shown, self._shown_at = list(self.subset), now
        scores = self.buffer.correlations().tolist()
        get_console().print(subset_table(self.grid_levels, self.subset, scores, self.sampler.discrete,
                                         trainer.global_step))

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: Tensor) -> None:
        sampler = self.sampler
        log_levels(trainer, pl_module, "adaptive", level, sampler.discrete)
        if sampler.last_x0 is not None:
            with torch.no_grad():
                alpha, beta = sampler.beta_params(sampler.last_x0)
            pl_module.log("adaptive/beta_mean", (alpha / (alpha + beta)).mean())
            pl_module.log("adaptive/beta_concentration", (alpha + beta).mean())
        if self._last_reward is not None:
            pl_module.log("adaptive/reward", self._last_reward)
