"""Uniform noise-level densities: discrete timesteps and continuous (log-)uniform sigma."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import InverseCDFDistribution

__all__ = ["UniformTimesteps", "UniformSigma"]


class UniformTimesteps(InverseCDFDistribution):
    """``t ~ U{0, ..., T-1}``, the DDPM default.

    Example::

        timesteps = UniformTimesteps(num_timesteps=1000)
        t, weight = timesteps.sample(64, device="cuda", generator=g)
    """

    discrete = True

    def __init__(self, num_timesteps: int = 1000) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"UniformTimesteps.num_timesteps={num_timesteps} must be >= 1.")
        self.num_timesteps = num_timesteps

    def icdf(self, u: Tensor) -> Tensor:
        return (u * self.num_timesteps).floor().long().clamp_(0, self.num_timesteps - 1)

    def cdf(self, level: Tensor) -> Tensor:
        return (level.double() + 1) / self.num_timesteps


class UniformSigma(InverseCDFDistribution):
    """Continuous sigma, uniform in ``ln sigma`` (``log_space=True``) or in sigma, on [sigma_min, sigma_max]."""

    discrete = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, log_space: bool = True) -> None:
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"UniformSigma needs 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        self.sigma_min, self.sigma_max, self.log_space = sigma_min, sigma_max, log_space

    def icdf(self, u: Tensor) -> Tensor:
        if self.log_space:
            lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
            return torch.exp(lo + u * (hi - lo)).float()
        return (self.sigma_min + u * (self.sigma_max - self.sigma_min)).float()

    def cdf(self, level: Tensor) -> Tensor:
        s = level.double()
        if self.log_space:
            lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
            return ((s.log() - lo) / (hi - lo)).clamp(0, 1)
        return ((s - self.sigma_min) / (self.sigma_max - self.sigma_min)).clamp(0, 1)
