"""GaussianMixtureMetrics: score a model against a Gaussian mixture's exact denoiser at each validation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from ..data.mixture import GaussianMixture
from ..metrics.mixture import DenoisingEvaluation, excess_percent, sample_scores, sigma_grid
from ..protocol import require

__all__ = ["GaussianMixtureMetrics"]


class GaussianMixtureMetrics(pl.Callback):
    """Log ``val/excess_pct`` (and per level), ``val/excess``, and sample scores against the exact truth.

    At every validation (not the sanity check) the module's ``denoise`` is run on a fixed set of
    ``eval_size`` mixture draws at ``num_levels`` VE noise levels log-spaced over
    [``sigma_min``, ``sigma_max``] (each process's nearest level, docs/algorithms.md 7.2) and logged:

    * ``val/excess_pct_level{i}``: ``100 E||D - D*||^2 / Bayes error`` at level ``i`` (0 = least noise);
    * ``val/excess_pct``: the geometric mean over levels of ``error / Bayes error``, minus 1, in %;
    * ``val/excess``: ``E||D - D*||^2`` per pixel, summed over levels.

    Every ``sample_every_n_validations``-th validation it also draws ``num_samples`` class-balanced
    samples with the module's ``sample`` (unclamped) and logs ``val/fd_exact`` (Frechet distance to
    the mixture's exact mean and covariance), ``val/class_accuracy`` and ``val/nll_gap``. ``floors``
    holds what true mixture samples of the same number score (the metric's own noise floor).

    ``conditional``: denoise and sample with the class labels and score against ``p(x0 | c)`` (default:
    when the module has ``num_classes > 0``); otherwise against the whole mixture.
    The mixture defaults to the DataModule's ``mixture`` (:class:`~lightning_diffusion.data.
    GaussianMixtureDataModule`). The module needs ``process`` and ``denoise`` (and ``sample`` when
    ``num_samples > 0``), see docs/callbacks.md. Work is split over ranks and summed, so every rank
    logs the same numbers.

    Example::

        trainer = pl.Trainer(callbacks=[GaussianMixtureMetrics(eval_size=1024, num_samples=500)])
        trainer.fit(module, datamodule=GaussianMixtureDataModule())
    """

    def __init__(self, mixture: GaussianMixture | None = None, num_levels: int = 8, sigma_min: float = 0.05,
                 sigma_max: float = 20.0, eval_size: int = 1024, num_samples: int = 0,
                 sample_every_n_validations: int = 1, conditional: bool | None = None, batch_size: int = 1024,
                 seed: int = 0) -> None:
        checks = {"num_levels": num_levels >= 1, "eval_size": eval_size >= 1, "num_samples": num_samples >= 0,
                  "sample_every_n_validations": sample_every_n_validations >= 1, "batch_size": batch_size >= 1,
                  "sigma_min": 0 < sigma_min < sigma_max}
        for setting, ok in checks.items():
            if not ok:
                raise ValueError(f"GaussianMixtureMetrics.{setting}={locals()[setting]!r} is out of range: counts "
                                 "must be >= 1 (num_samples >= 0) and 0 < sigma_min < sigma_max.")
        self.mixture = mixture
        self.sigmas = sigma_grid(num_levels, sigma_min, sigma_max)
        self.eval_size, self.num_samples, self.every = eval_size, num_samples, sample_every_n_validations
        self._conditional, self.batch_size, self.seed = conditional, batch_size, seed
        self.evaluation: DenoisingEvaluation | None = None
        self.floors: dict[str, float] = {}
        self._entropy = 0.0
        self._validations = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(self).__name__
        self.mixture = self.mixture or getattr(trainer.datamodule, "mixture", None)
        if not isinstance(self.mixture, GaussianMixture):
            raise ValueError(f"{name}.mixture: give a GaussianMixture, or train on a DataModule with a `mixture` "
                             "attribute (lightning_diffusion.data.GaussianMixtureDataModule).")
        require(pl_module, name, "process", "denoise", *(("sample",) if self.num_samples else ()))
        if not is_overridden("validation_step", pl_module):  # else Lightning skips validation: a silent no-op
            raise ValueError(f"{name} scores the model at each validation, and {type(pl_module).__name__} has no "
                             "validation_step, so Lightning never validates: add one (it may simply pass).")
        if isinstance(trainer.strategy, ModelParallelStrategy) and self.eval_size % trainer.world_size:
            # A sharded forward is a collective: every rank must denoise as many batches as the others.
            raise ValueError(f"{name}.eval_size={self.eval_size}: under sharded training (FSDP2) every rank scores "
                             f"an equal share; use a multiple of the {trainer.world_size} processes.")
        if self._conditional is None:
            self._conditional = int(getattr(pl_module, "num_classes", 0) or 0) > 0
        self.evaluation = DenoisingEvaluation(self.mixture, pl_module.process, self.sigmas, self.eval_size,
                                              self.seed, self._conditional)
        if self.num_samples:
            # The metrics' own floor and the entropy: true samples with the same label mix.
            labels, big_labels = self._labels(1), self._labels(10)
            true, _ = self.mixture.sample(self.num_samples, torch.Generator().manual_seed(self.seed + 1), labels)
            big, _ = self.mixture.sample(10 * self.num_samples, torch.Generator().manual_seed(self.seed + 2),
                                         big_labels)
            self._entropy = float(-self.mixture.log_prob(big, big_labels).mean() / self.mixture.dim)
            scores = sample_scores(true, labels, self.mixture, self._entropy)
            self.floors = {k: float(v) for k, v in scores.items()}

    def _labels(self, repeats: int) -> torch.Tensor | None:
        """Class-balanced labels for the samples (None for an unconditional model)."""
        if not self._conditional:
            return None
        return (torch.arange(self.num_samples) % self.mixture.num_classes).repeat(repeats)  # type: ignore[union-attr]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.evaluation is None:
            return
        self._validations += 1
        world, rank = trainer.world_size, trainer.global_rank
        index = torch.arange(rank, self.eval_size, world)
        sums = self.evaluation.excess(pl_module.denoise, pl_module.device, index, self.batch_size)
        excess = trainer.strategy.reduce(sums, reduce_op="sum") / self.eval_size  # one process: unchanged
        bayes = self.evaluation.bayes
        metrics = {"excess_pct": excess_percent(excess, bayes), "excess": excess.sum().cpu()}
        for i, value in enumerate((100 * excess.cpu() / bayes).tolist()):
            metrics[f"excess_pct_level{i}"] = torch.tensor(value)
        if self.num_samples and self._validations % self.every == 0:
            metrics.update(self._sample_scores(trainer, pl_module))
        for key, value in metrics.items():
            # identical on every rank already; sync_dist only averages equal values (and keeps Lightning quiet)
            pl_module.log(f"val/{key}", value.float().to(pl_module.device), sync_dist=True)

    def _sample_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """Generate on rank 0's seed on every rank (identical), score on the CPU: same numbers everywhere."""
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + 3)
        labels = self._labels(1)
        device_labels = None if labels is None else labels.to(pl_module.device)
        samples = pl_module.sample(self.num_samples, class_labels=device_labels, generator=generator, clamp=False)
        return sample_scores(samples, labels, self.mixture, self._entropy)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))
