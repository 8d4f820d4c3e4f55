"""TimestepCurriculum: easy-to-hard noise-level stages with loss-driven phase switching.

A thin adapter over :mod:`lightning_diffusion.timesteps.curriculum` (docs/algorithms.md 5): the
clusters and the pacers live there; this file maps them onto Lightning's hooks, DDP and checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from rich.console import Console
from torch import Tensor

from ..clock import ImageClock, images_seen
from ..protocol import require, require_outputs
from .steps import OptimizerStepGate
from ..timesteps import TimestepDistribution
from ..timesteps.defaults import default_timesteps
from ..timesteps.curriculum import CLUSTERINGS, FixedPacer, PatiencePacer, cluster_bounds, stage_support

__all__ = ["TimestepCurriculum"]

PACINGS = ("patience", "fixed")
_CHECKED_BATCHES = 3  # micro-batches after each stage change whose levels are checked against the stage


class TimestepCurriculum(pl.Callback):
    """Train on the noisiest (easiest) noise levels first, adding harder clusters stage by stage.

    The noise range is split into ``num_clusters`` clusters of equal probability under the base
    density (uniform ``t`` intervals for discrete processes, equal-mass intervals of the training
    density for sigma processes) or, with ``clustering="log_snr"``, of equal log-SNR width. Stage
    ``n`` restricts ``pl_module.timesteps`` (whatever it is: uniform, log-normal, loss-aware, ...)
    to the ``n`` noisiest clusters through its ``restrict(u_low, u_high)``: an exact truncation, no
    rejection. After the last stage training covers every noise level.

    Args:
        num_clusters: number of clusters and of stages ``N``.
        patience: ``pacing="patience"``: advance when the smoothed loss has not improved for more
            than this many optimizer steps.
        pacing: ``"patience"`` (loss-driven) or ``"fixed"`` (``steps_per_stage`` steps per stage).
        smoothing: EMA factor of the loss the pacer watches (0: the raw loss).
        min_delta, delta_mode: an improvement must beat the best by ``min_delta * |best|``
            (``"relative"``) or by ``min_delta`` (``"absolute"``).
        max_steps_per_stage: hard cap on a stage's length in optimizer steps (``None``: no cap).
        steps_per_stage: stage length for ``pacing="fixed"``.
        clustering: ``"quantile"`` (equal probability) or ``"log_snr"`` (equal log-SNR width).
        check_every_n_steps: the pacer reads the losses (one host sync) every this many optimizer
            steps and replays them in order; a switch takes effect at that check, and the losses
            after the switching step (still drawn from the old stage) are dropped.
        verbose: print one Rich line on global rank 0 at each switch.

    The pacer sees, per optimizer step, the mean over ranks of each rank's micro-batch-averaged
    ``per_sample_loss`` (all-reduced on device every step), so every rank switches at the same step.
    ``curriculum/stage`` and ``curriculum/smoothed_loss`` are logged on the trainer's logging steps.

    Example::

        trainer = pl.Trainer(callbacks=[TimestepCurriculum(num_clusters=20, patience=200)])
    """

    def __init__(self, num_clusters: int = 20, patience: int = 200, pacing: str = "patience",
                 smoothing: float = 0.98, min_delta: float = 0.0, delta_mode: str = "relative",
                 max_steps_per_stage: int | None = None, steps_per_stage: int | None = None,
                 clustering: str = "quantile", check_every_n_steps: int = 10, verbose: bool = True) -> None:
        if pacing not in PACINGS:
            raise ValueError(f"TimestepCurriculum.pacing={pacing!r} is not supported; use one of {PACINGS}.")
        if clustering not in CLUSTERINGS:
            raise ValueError(f"TimestepCurriculum.clustering={clustering!r} is not supported; use one of "
                             f"{CLUSTERINGS}.")
        if check_every_n_steps < 1:
            raise ValueError(f"TimestepCurriculum.check_every_n_steps={check_every_n_steps} must be >= 1.")
        if pacing == "fixed":
            if steps_per_stage is None:
                raise ValueError("TimestepCurriculum.steps_per_stage must be set (>= 1) with pacing='fixed'.")
            self.pacer: FixedPacer | PatiencePacer = FixedPacer(num_clusters, steps_per_stage)
        else:
            self.pacer = PatiencePacer(num_clusters, patience, smoothing, min_delta, delta_mode, max_steps_per_stage)
        self.num_clusters, self.pacing, self.clustering = num_clusters, pacing, clustering
        self.check_every_n_steps, self.verbose = check_every_n_steps, verbose
        self.u_bounds: list[float] | None = None
        self.level_bounds: list[float] | None = None
        self.switches: list[dict[str, Any]] = []  # {"step", "nimg", "stage"} of every switch
        self.gate = OptimizerStepGate()
        self._stage_checks = 0  # micro-batches whose levels are checked against the stage (after each change)
        self._micro_sum: Tensor | None = None
        self._micro_count = 0
        self._buffer: Tensor | None = None  # all-reduced per-step losses not yet read by the pacer
        self._fill = 0
        self._pending: Tensor | None = None  # buffered losses restored from a checkpoint

    @property
    def state_key(self) -> str:
        return "TimestepCurriculum"  # independent of the init arguments: a resume may change patience

    @property
    def stage(self) -> int:
        return self.pacer.stage

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ImageClock.attach(trainer)  # switch times are logged in images seen (before the restore reads its state)

    # ------------------------------------------------------------------ partition and restriction
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.gate.start(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup (samplers installed or wrapped) and after checkpoint restore.
        require(pl_module, "TimestepCurriculum", "timesteps", "process")
        process = pl_module.process
        timesteps: TimestepDistribution = pl_module.timesteps
        if type(timesteps).restrict is TimestepDistribution.restrict:
            raise ValueError(f"TimestepCurriculum needs a timestep distribution with restrict(u_low, u_high); "
                             f"{type(timesteps).__name__} has none.")
        u_bounds, level_bounds = cluster_bounds(process, self.num_clusters, self.clustering,
                                                None if process.discrete else _base_density(timesteps, process))
        if self.u_bounds is None:
            self.u_bounds, self.level_bounds = u_bounds, level_bounds
        elif len(self.u_bounds) != self.num_clusters + 1:
            raise ValueError(f"TimestepCurriculum.num_clusters={self.num_clusters} does not match the checkpoint's "
                             f"{len(self.u_bounds) - 1} clusters; resume with the same num_clusters.")
        self._apply(pl_module)

    def _apply(self, pl_module: pl.LightningModule) -> None:
        assert self.u_bounds is not None
        pl_module.timesteps.restrict(*stage_support(self.u_bounds, self.pacer.stage))
        self._stage_checks = _CHECKED_BATCHES

    def _check_stage_obeyed(self, pl_module: pl.LightningModule, level: Tensor) -> None:
        """The first micro-batches of a stage: the levels trained on must lie in the stage's support."""
        self._stage_checks -= 1
        if self.pacer.finished:
            return
        assert self.level_bounds is not None
        edge = float(self.level_bounds[self.num_clusters - self.pacer.stage])
        lowest = float(level.detach().double().min())  # one host read, on these few micro-batches only
        if lowest < edge * (1 - 1e-6) - 1e-9:
            raise ValueError(f"TimestepCurriculum: stage {self.pacer.stage}/{self.num_clusters} allows "
                             f"{self._describe(pl_module)}, but the module trained on level {lowest:.4g}; "
                             f"draw the levels with module.timesteps.sample(...), which the curriculum restricts.")

    def _describe(self, pl_module: pl.LightningModule) -> str:
        assert self.level_bounds is not None
        if self.pacer.finished:
            return "all noise levels"
        edge = self.level_bounds[self.num_clusters - self.pacer.stage]
        if pl_module.process.discrete:
            return f"t in [{int(edge)}, {pl_module.process.num_timesteps - 1}]"
        return f"{'t' if pl_module.process.level_kind == 't' else 'sigma'} >= {edge:.4g}"

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        outputs = require_outputs(outputs, "TimestepCurriculum", "per_sample_loss", "level")
        if self._stage_checks > 0:
            self._check_stage_obeyed(pl_module, outputs["level"])
        if not self.pacer.finished and self.pacing == "patience":
            self._accumulate(outputs)
        if not self.gate.passed(trainer):  # a micro-batch of gradient accumulation: no optimizer step
            return
        if not self.pacer.finished:
            if self.pacing == "fixed":
                if self.pacer.step():
                    self._switch(trainer, pl_module)
            else:
                self._push(trainer)
                if self._fill >= self.check_every_n_steps:
                    self._check(trainer, pl_module)
        every = trainer.log_every_n_steps
        if every and step % every == 0:  # the module's logging steps: no per-step logging cost
            pl_module.log("curriculum/stage", float(self.pacer.stage))
            smoothed = getattr(self.pacer, "last_smoothed", math.nan)
            if math.isfinite(smoothed):
                pl_module.log("curriculum/smoothed_loss", smoothed)

    def _accumulate(self, outputs: dict[str, Tensor]) -> None:
        value = outputs["per_sample_loss"].detach().float().mean()
        self._micro_sum = value if self._micro_sum is None else self._micro_sum + value
        self._micro_count += 1

    def _push(self, trainer: pl.Trainer) -> None:
        """Store this optimizer step's loss, averaged over micro-batches and ranks, on device."""
        if self._micro_sum is None:  # training_step returned nothing: still join the collective below
            self._micro_sum, self._micro_count = torch.full((), math.nan, device=trainer.strategy.root_device), 1
        # Every rank calls this collective at every optimizer step, so none can skip it and hang.
        value = trainer.strategy.reduce(self._micro_sum / self._micro_count, reduce_op="mean")
        self._micro_sum, self._micro_count = None, 0
        if self._buffer is None or self._buffer.device != value.device:
            pending = self._pending if self._pending is not None else torch.zeros(0)
            self._buffer = torch.zeros(max(self.check_every_n_steps, len(pending) + 1), device=value.device)
            self._buffer[: len(pending)] = pending.to(value.device)
            self._fill, self._pending = len(pending), None
        self._buffer[self._fill] = value
        self._fill += 1

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._buffer is not None
        values = self._buffer[: self._fill].tolist()  # the one host sync, every check_every_n_steps steps
        self._fill = 0
        for value in values:
            if self.pacer.step(value):
                self._switch(trainer, pl_module)
                return  # the rest was drawn from the old stage: it says nothing about the new one

    def _switch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module)
        self.switches.append({"step": trainer.global_step, "nimg": images_seen(trainer), "stage": self.pacer.stage})
        if self.verbose and trainer.is_global_zero:
            smoothed = getattr(self.pacer, "last_smoothed", math.nan)
            loss = f" (smoothed loss {smoothed:.4g})" if math.isfinite(smoothed) else ""
            Console().print(f"[bold cyan]TimestepCurriculum[/] step {trainer.global_step}: stage "
                            f"{self.pacer.stage}/{self.num_clusters}, {self._describe(pl_module)}{loss}")

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        if self._buffer is not None:
            buffered = self._buffer[: self._fill].detach().cpu()
        else:
            buffered = self._pending if self._pending is not None else torch.zeros(0)
        return {"pacing": self.pacing, "pacer": self.pacer.state_dict(), "clustering": self.clustering,
                "u_bounds": self.u_bounds, "level_bounds": self.level_bounds, "last_step": self.gate.last_step,
                "buffered_losses": buffered, "switches": [dict(s) for s in self.switches]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["pacing"] == self.pacing:
            self.pacer.load_state_dict(state_dict["pacer"])
        else:  # a resume that changes the pacing keeps the stage and starts the new pacer's counters
            self.pacer.stage = int(state_dict["pacer"]["stage"])
        self.u_bounds = [float(u) for u in state_dict["u_bounds"]] if state_dict["u_bounds"] else None
        self.level_bounds = [float(b) for b in state_dict["level_bounds"]] if state_dict["level_bounds"] else None
        self.gate.last_step = int(state_dict["last_step"])  # on_train_start sets it from the restored step too
        self._pending, self._buffer, self._fill = state_dict["buffered_losses"].float().cpu(), None, 0
        self.switches = [dict(s) for s in state_dict["switches"]]


def _base_density(timesteps: TimestepDistribution, process: Any) -> Any:
    """The density whose CDF coordinate ``restrict`` uses (sigma processes; docs/algorithms.md 5).

    The distribution itself when it has an inverse CDF, else its ``base`` (wrapping samplers), else
    the process's default training density.
    """
    for candidate in (timesteps, getattr(timesteps, "base", None)):
        if candidate is not None and hasattr(candidate, "cdf") and hasattr(candidate, "icdf"):
            return candidate
    return default_timesteps(process)
