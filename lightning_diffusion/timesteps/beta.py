"""Gamma and Beta draws from an explicit ``torch.Generator`` (pure torch, no host sync).

``torch.distributions.Beta.sample`` takes no generator, so draws from it are neither per-rank nor
resumable. These samplers consume a fixed number of normals and uniforms per draw from the
generator given (Marsaglia & Tsang 2000, vectorized), so a resumed run reproduces every draw.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["log_gamma_sample", "beta_sample"]

# Candidates per draw: Marsaglia-Tsang accepts with probability >= 0.95 for shape >= 1, so all 12
# rejected has probability < 1e-15; that case falls back to the mode-like value d (documented bias).
_CANDIDATES = 12


def log_gamma_sample(shape: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``log G`` with ``G ~ Gamma(shape, 1)`` per element (float32, any positive ``shape``).

    Works in log space so tiny shapes (``G`` underflowing to 0) stay finite: for ``shape < 1`` it
    draws ``Gamma(shape + 1)`` and adds ``log(U) / shape`` (the ``U^(1/a)`` boost).
    """
    a = shape.float()
    boost = a < 1
    a1 = torch.where(boost, a + 1, a)
    d = a1 - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    x = torch.randn((*a.shape, _CANDIDATES), generator=generator, device=a.device)
    u = torch.rand((*a.shape, _CANDIDATES), generator=generator, device=a.device)
    v = (1 + c.unsqueeze(-1) * x) ** 3
    log_v = v.clamp_min(1e-30).log()
    dd = d.unsqueeze(-1)
    ok = (v > 0) & (u.clamp_min(1e-30).log() < 0.5 * x.square() + dd - dd * v + dd * log_v)
    first = ok.int().argmax(-1, keepdim=True)  # index of the first accepted candidate (0 if none)
    log_g = d.log() + torch.where(ok.any(-1), log_v.gather(-1, first).squeeze(-1), torch.zeros_like(d))
    boost_u = torch.rand(a.shape, generator=generator, device=a.device).clamp_min(1e-30)
    return torch.where(boost, log_g + boost_u.log() / a, log_g)


def beta_sample(alpha: Tensor, beta: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``u ~ Beta(alpha, beta)`` per element as ``Ga / (Ga + Gb)`` = ``sigmoid(log Ga - log Gb)``.

    Example::

        u = beta_sample(torch.full((64,), 2.0), torch.full((64,), 5.0), generator=g)
    """
    log_g = log_gamma_sample(torch.stack([alpha, beta]), generator)
    return torch.sigmoid(log_g[0] - log_g[1])
