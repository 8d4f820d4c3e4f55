"""The adaptive sampler's look-ahead signal (docs/algorithms.md 4): losses before and after one
optimizer step, the ring buffer of per-timestep decreases, and the choice of the subset S.

What "loss" means is a term with one signature, ``term(module, x0, noise, level, labels) -> [B]``:
:class:`TrainingLossTerm` (the weighted training MSE, the library's default) or :class:`VLBTerm`
(the per-timestep KL of the variational bound in bits/dim, the paper's official choice).

Pure torch (no Lightning import). The network is reached through the callback protocol
(docs/callbacks.md): the module's ``lookahead_loss(x0, noise, level, labels) -> [B]`` for
:class:`TrainingLossTerm` and ``denoise(x_noisy, level, labels) -> x0_hat`` with its ``process``
for :class:`VLBTerm`; :class:`~lightning_diffusion.DiffusionLightningModule` has both.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..core.noise import NoiseProcess
from ..core.vlb import vlb_weights

__all__ = ["probe_quantiles", "evenly_spaced_subset", "TrainingLossTerm", "VLBTerm", "LookaheadBatch",
           "LookaheadBuffer"]

# term(module, x0, noise, level, labels) -> per-sample value [B] (fp32): what the look-ahead measures.
LookaheadTerm = Callable[[Any, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


class TrainingLossTerm:
    """The module's per-sample training loss at each level (``module.lookahead_loss``)."""

    def __call__(self, module: Any, x0: Tensor, noise: Tensor, level: Tensor, labels: Tensor | None) -> Tensor:
        return module.lookahead_loss(x0, noise, level, labels).float()


class VLBTerm:
    """The per-sample variational-bound term ``L_t = w_t mean_d (x0_hat - x0)^2`` in bits/dim
    (:mod:`~lightning_diffusion.core.vlb`): ``x0_hat = module.denoise(x_t, t, labels)``, whatever the
    network predicts; the error and ``w_t`` (from a float64 table) are fp32, autocast off.
    """

    def __init__(self, process: NoiseProcess) -> None:
        self.process, self.weights = process, vlb_weights(process)
        self._on: dict[torch.device, Tensor] = {}

    def __call__(self, module: Any, x0: Tensor, noise: Tensor, level: Tensor, labels: Tensor | None) -> Tensor:
        x_noisy = self.process.add_noise(x0, noise, level)
        t = level.long()
        weights = self._on.get(t.device)
        if weights is None:
            weights = self._on[t.device] = self.weights.to(device=t.device, dtype=torch.float32)
        x0_hat = module.denoise(x_noisy, level, labels)  # the network under the run's precision
        with torch.autocast(device_type=x0.device.type, enabled=False):
            return weights[t] * (x0_hat.float() - x0.float()).square().flatten(1).mean(1)


def probe_quantiles(probe_grid: int | Sequence[float]) -> Tensor:
    """Base-density quantiles of the probe grid (float64): ``n`` mid-quantiles, or the values given."""
    if isinstance(probe_grid, int):
        if probe_grid < 2:
            raise ValueError(f"probe_grid={probe_grid} must be >= 2 (grid points) or a list of quantiles in (0, 1).")
        return (torch.arange(probe_grid, dtype=torch.float64) + 0.5) / probe_grid
    u = torch.tensor([float(v) for v in probe_grid], dtype=torch.float64)
    if u.numel() < 2 or not bool(((u > 0) & (u < 1)).all()):
        raise ValueError(f"probe_grid={list(probe_grid)} must hold >= 2 quantiles, each in (0, 1).")
    return u.sort().values


class LookaheadBatch:
    """One evaluation batch: every image of ``x0`` at each subset level, plus ``probe_images``
    images at each grid level, with noise drawn once so "after" reuses it (common random numbers).
    """

    def __init__(self, x0: Tensor, labels: Tensor | None, subset_levels: Tensor, grid_levels: Tensor,
                 probe_images: int, generator: torch.Generator | None) -> None:
        self.batch, self.subset, self.grid = x0.shape[0], len(subset_levels), len(grid_levels)
        self.probes = min(probe_images, self.batch)
        ones = [1] * (x0.ndim - 1)
        probe = x0[: self.probes]
        # Rows [s * B + i]: image i at subset level s; then rows [g * P + p]: probe p at grid level g.
        self.x0 = torch.cat([x0.repeat(self.subset, *ones), probe.repeat(self.grid, *ones)])
        self.level = torch.cat([subset_levels.repeat_interleave(self.batch),
                                grid_levels.repeat_interleave(self.probes)])
        self.labels = None if labels is None else torch.cat(
            [labels.repeat(self.subset), labels[: self.probes].repeat(self.grid)])
        self.generator = generator
        self.noise = self.draw_noise()

    def draw_noise(self) -> Tensor:
        return torch.randn(self.x0.shape, generator=self.generator, device=self.x0.device, dtype=self.x0.dtype)

    @torch.no_grad()
    def losses(self, module: Any, chunk: int, term: LookaheadTerm | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample ``term`` values ``[|S|, B]`` and the probes' mean per grid level ``[G]``;
        ``term`` defaults to :class:`TrainingLossTerm`."""
        term = term or TrainingLossTerm()
        parts = []
        for i in range(0, len(self.level), chunk):
            j = slice(i, i + chunk)
            labels = None if self.labels is None else self.labels[j]
            parts.append(term(module, self.x0[j], self.noise[j], self.level[j], labels))
        loss = torch.cat(parts)
        n = self.subset * self.batch
        return loss[:n].view(self.subset, self.batch), loss[n:].view(self.grid, self.probes).mean(1)


class LookaheadBuffer:
    """Ring buffer of the last ``size`` loss decreases ``dL`` over the probe grid, with ``y = sum dL``.

    ``select(k)`` returns the k grid indices whose decrease correlates most (|Pearson r|) with the
    total decrease ``y``: the timesteps whose loss tracks the whole objective (docs/algorithms.md 4).

    Example::

        buffer = LookaheadBuffer(num_levels=20, size=20)
        buffer.push(before - after)
        subset = buffer.select(3)  # None until two entries are in
    """

    def __init__(self, num_levels: int, size: int = 20) -> None:
        if size < 2:
            raise ValueError(f"buffer_size={size} must be >= 2 (a correlation needs two entries).")
        self.size = size
        self.dL = torch.zeros(size, num_levels)
        self.y = torch.zeros(size)
        self.count = 0  # entries ever pushed; the next goes to row count % size

    @property
    def filled(self) -> int:
        return min(self.count, self.size)

    def push(self, dL: Tensor) -> None:
        if self.dL.device != dL.device:
            self.dL, self.y = self.dL.to(dL.device), self.y.to(dL.device)
        row = self.count % self.size
        self.dL[row] = dL.float()
        self.y[row] = dL.float().sum()
        self.count += 1

    def correlations(self) -> Tensor:
        """|Pearson r| of each grid level's dL with y over the filled rows (0 where either is constant)."""
        n = self.filled
        x = self.dL[:n].double()
        y = self.y[:n].double()
        xc, yc = x - x.mean(0), y - y.mean()
        cov = (xc * yc[:, None]).sum(0)
        den = (xc.square().sum(0) * yc.square().sum()).sqrt()
        return torch.where(den > 0, cov.abs() / den.clamp_min(1e-300), torch.zeros_like(cov)).float()

    def select(self, k: int) -> Tensor | None:
        """The k most correlated grid indices, ascending; ``None`` with fewer than two entries."""
        if self.filled < 2:
            return None
        return self.correlations().topk(k).indices.sort().values

    def state_dict(self) -> dict[str, Any]:
        return {"dL": self.dL.clone(), "y": self.y.clone(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["dL"].shape) != tuple(self.dL.shape):
            raise ValueError(f"AdaptiveTimestepSampling: the checkpoint's buffer has shape {tuple(state['dL'].shape)}; "
                             f"buffer_size and probe_grid give {tuple(self.dL.shape)}: resume with the same settings.")
        self.dL, self.y = state["dL"].clone(), state["y"].clone()
        self.count = int(state["count"])


def evenly_spaced_subset(num_levels: int, k: int) -> Tensor:
    """The starting subset S before the buffer can rank levels: k grid indices spread evenly."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_levels / k).floor().long()
