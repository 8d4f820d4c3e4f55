"""Loss-aware importance sampling of noise levels (improved-diffusion's sampler, docs/algorithms.md 4).

Levels are grouped in bins: one per timestep for discrete processes, a log-sigma grid for sigma
processes. Each bin ``b`` has its base-density mass ``q_b`` (from the base CDF; ``1/T`` for uniform
t) and a ring of its last ``history`` per-sample losses. Until every bin in range holds ``history``
losses the sampler draws from the base density; then bin b with ``p_b ∝ q_b sqrt(mean L_b^2)``
mixed with ``uniform_prob`` of the base (uniform t: ``p_t ∝ sqrt(mean L_t^2)``, the original), and
weights each sample by ``q_b / p_b`` (``1/(T p_t)``), so ``E_p[w L] = E_q[L]``: the objective is
unchanged, only its variance drops. Inside a sigma bin, u is uniform on the bin's CDF interval
and goes through the base inverse CDF. All per-step work is tensor ops: no host sync.
Pure torch: no Lightning import.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import InverseCDFDistribution, LearnedSampler

__all__ = ["LossAwareTimesteps"]


class LossAwareTimesteps(LearnedSampler):
    """Importance-sample noise levels by the root mean square of their recent losses.

    Args:
        base: the density to keep unbiased against (``UniformTimesteps``, ``LogNormalSigma``, ...).
        history: losses kept per bin (improved-diffusion: 10).
        uniform_prob: mass of the base density mixed into the learned one (improved-diffusion: 1e-3).
        num_bins: sigma processes only: bins on a log-sigma grid between the base quantiles
            ``range_quantile`` and ``1 - range_quantile`` (the two end bins reach to 0 and infinity).
        range_quantile: see ``num_bins``.

    Example::

        timesteps = LossAwareTimesteps(UniformTimesteps(1000), history=10)
        t, w = timesteps.sample(64, "cuda", generator=g)   # loss = (w * per_sample).mean()
        timesteps.update(t, per_sample.detach())
    """

    def __init__(self, base: InverseCDFDistribution, history: int = 10, uniform_prob: float = 1e-3,
                 num_bins: int = 64, range_quantile: float = 1e-3) -> None:
        super().__init__(base)
        if history < 1:
            raise ValueError(f"LossAwareTimesteps.history={history} must be >= 1.")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"LossAwareTimesteps.uniform_prob={uniform_prob} must be in [0, 1].")
        if not base.discrete and num_bins < 2:
            raise ValueError(f"LossAwareTimesteps.num_bins={num_bins} must be >= 2.")
        if not 0.0 < range_quantile < 0.5:
            raise ValueError(f"LossAwareTimesteps.range_quantile={range_quantile} must be in (0, 0.5).")
        self.history, self.uniform_prob = int(history), float(uniform_prob)
        if base.discrete:
            self.num_bins = base.num_timesteps
            self.log_edges = torch.empty(0)
            inner = base.cdf(torch.arange(self.num_bins - 1))
        else:
            self.num_bins, self.range_quantile = int(num_bins), float(range_quantile)
            ends = base.icdf(torch.tensor([range_quantile, 1 - range_quantile], dtype=torch.float64)).double().log()
            grid = torch.linspace(float(ends[0]), float(ends[1]), self.num_bins + 1, dtype=torch.float64)
            self.log_edges = grid[1:-1]
            inner = base.cdf(self.log_edges.exp())
        # CDF edges of the bins (float64): bin b covers base-u in [cdf_edges[b], cdf_edges[b + 1]].
        self.cdf_edges = torch.cat([inner.new_zeros(1), inner.double(), inner.new_ones(1)])
        # Row num_bins is a sink for padded / dropped entries; it never counts.
        self.ring = torch.zeros(self.num_bins + 1, self.history)
        self.ptr = torch.zeros(self.num_bins + 1, dtype=torch.long)
        self.count = torch.zeros(self.num_bins + 1, dtype=torch.long)
        self._refresh()

    # ------------------------------------------------------------------ the distribution over bins
    def _refresh(self) -> None:
        """Recompute the restricted base masses q, the sampling probabilities p and their CDF."""
        edges = self.cdf_edges
        lo = edges[:-1].clamp(self.u_low, self.u_high)
        hi = edges[1:].clamp(self.u_low, self.u_high)
        self.bin_low, self.bin_width = lo, hi - lo
        q = (hi - lo) / (self.u_high - self.u_low)  # the restricted base's mass per bin
        counts = self.count[: self.num_bins]
        mean_sq = self.ring[: self.num_bins].double().square().sum(1) / counts.clamp_min(1)
        learned = q * mean_sq.sqrt()
        learned = learned / learned.sum().clamp_min(1e-300)
        learned = (1 - self.uniform_prob) * learned + self.uniform_prob * q
        # Warm once every bin in range holds `history` losses. Bins cut to a sliver by restrict()
        # (< 0.1% of the largest bin's mass) would take forever to fill and barely matter: skipped.
        warm = ((counts >= self.history) | (q < 1e-3 * q.max())).all()  # a tensor: no host sync
        p = torch.where(warm, learned, q)
        self.q, self.p = q, p / p.sum()
        self.p_cdf = self.p.cumsum(0)
        self.weights = torch.where(self.p > 0, q / self.p.clamp_min(1e-300), torch.zeros_like(q)).float()
        self.warm = warm

    def _to(self, device: torch.device) -> None:
        if self.ring.device != device:
            self.ring, self.ptr, self.count = self.ring.to(device), self.ptr.to(device), self.count.to(device)
            self.log_edges, self.cdf_edges = self.log_edges.to(device), self.cdf_edges.to(device)
            self._refresh()

    def sample(self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
               x0: Tensor | None = None, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._to(torch.device(device))
        r = torch.rand(2, batch_size, generator=generator, device=device, dtype=torch.float64)
        b = torch.searchsorted(self.p_cdf, r[0] * self.p_cdf[-1], right=True).clamp_(max=self.num_bins - 1)
        if self.discrete:
            level = b
        else:  # u uniform on the bin's (restricted) CDF interval, then the base inverse CDF
            level = self.base.icdf(self.bin_low[b] + self.bin_width[b] * r[1])
        return self.record(level, self.weights[b])

    def on_restrict(self) -> None:
        """Bins outside ``[u_low, u_high]`` of the base CDF get no mass, the rest renormalized; the
        weights then keep the *restricted* base's objective unbiased."""
        self._refresh()

    def mass_by_quantile(self, parts: int = 4) -> Tensor:
        """Sampling mass in each of ``parts`` equal slices of the base CDF (0 = least noise), bins
        assigned by their centre: the (restricted) base's mass until warm, then where the draws go."""
        centers = (self.cdf_edges[:-1] + self.cdf_edges[1:]) / 2
        part = (centers * parts).long().clamp_(0, parts - 1)
        return torch.zeros(parts, dtype=self.p.dtype, device=self.p.device).index_add_(0, part, self.p)

    # ------------------------------------------------------------------ learning
    def bin_of(self, level: Tensor) -> Tensor:
        """The bin index of each level (long)."""
        if self.discrete:
            return level.long()
        return torch.bucketize(level.double().log(), self.log_edges.to(level.device))

    def update(self, level: Tensor, per_sample_loss: Tensor) -> None:
        self.update_bins(self.bin_of(level), per_sample_loss)

    def update_bins(self, bins: Tensor, losses: Tensor) -> None:
        """Push losses into their bins' rings, in order; ``bins == num_bins`` marks padding (ignored).

        Vectorized: a stable sort groups each bin's entries; entry k of a bin's group goes to slot
        ``(ptr + k) % history``, and only a group's last ``history`` entries are written, so slots
        never collide and the ring keeps exactly the most recent losses.
        """
        self._to(bins.device)
        B, H = self.num_bins, self.history
        bins, order = torch.sort(bins.long().clamp(0, B), stable=True)
        losses = losses.detach().float()[order]
        start = torch.searchsorted(bins, bins, right=False)
        size = torch.searchsorted(bins, bins, right=True) - start
        rank = torch.arange(len(bins), device=bins.device) - start
        row = torch.where(rank >= size - H, bins, torch.full_like(bins, B))
        slot = (self.ptr[bins] + rank) % H
        self.ring.index_put_((row, slot), losses)
        added = torch.zeros_like(self.count).scatter_add_(0, bins, torch.ones_like(bins))
        self.ptr = (self.ptr + added) % H
        self.count = (self.count + added).clamp_(max=H)
        self.ring[B], self.ptr[B], self.count[B] = 0.0, 0, 0
        self._refresh()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "u_low": self.u_low, "u_high": self.u_high,
                "ring": self.ring.clone(), "ptr": self.ptr.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ring" not in state:  # a checkpoint of the plain base density: start an empty history
            self.base.load_state_dict(state)
            self.u_low, self.u_high = self.base.u_low, self.base.u_high
            self._refresh()
            return
        if tuple(state["ring"].shape) != tuple(self.ring.shape):
            raise ValueError(f"LossAwareTimesteps: the checkpoint's history has shape {tuple(state['ring'].shape)}; "
                             f"history={self.history} and {self.num_bins} bins need {tuple(self.ring.shape)}.")
        self.base.load_state_dict(state["base"])
        self.u_low, self.u_high = float(state["u_low"]), float(state["u_high"])
        device = self.ring.device
        self.ring, self.ptr, self.count = (state[k].to(device).clone() for k in ("ring", "ptr", "count"))
        self._refresh()

    def __repr__(self) -> str:
        return (f"LossAwareTimesteps(base={self.base!r}, history={self.history}, uniform_prob={self.uniform_prob}, "
                f"num_bins={self.num_bins})")

