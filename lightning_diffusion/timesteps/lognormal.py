"""EDM's log-normal training density, ``ln sigma ~ N(P_mean, P_std^2)`` (docs/algorithms.md 0)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import InverseCDFDistribution

__all__ = ["LogNormalSigma", "normal_icdf", "normal_cdf"]

# u is clamped this far from 0 and 1 so the inverse CDF stays finite (|z| <= 7.0).
_U_EPS = 1e-12


def normal_icdf(u: Tensor) -> Tensor:
    """The standard normal's inverse CDF in float64, ``u`` clamped so that ``|z| <= 7``."""
    return math.sqrt(2.0) * torch.erfinv(2 * u.double().clamp(_U_EPS, 1 - _U_EPS) - 1)


def normal_cdf(z: Tensor) -> Tensor:
    """The standard normal's CDF, ``Phi(z)``."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))


class LogNormalSigma(InverseCDFDistribution):
    """``sigma = exp(P_mean + P_std * Phi^-1(u))`` (EDM: -1.2, 1.2; EDM2 latents: -0.4, 1.0).

    Example::

        timesteps = LogNormalSigma(P_mean=-1.2, P_std=1.2)
    """

    discrete = False
    level_kind = "sigma"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2) -> None:
        super().__init__()
        if not P_std > 0:
            raise ValueError(f"LogNormalSigma.P_std={P_std} must be > 0.")
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def icdf(self, u: Tensor) -> Tensor:
        return torch.exp(self.P_mean + self.P_std * normal_icdf(u)).float()

    def cdf(self, level: Tensor) -> Tensor:
        return normal_cdf((level.double().log() - self.P_mean) / self.P_std)
