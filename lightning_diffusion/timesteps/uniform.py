"""Uniform noise-level densities: discrete timesteps and continuous (log-)uniform sigma."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import InverseCDFDistribution

__all__ = ["UniformTimesteps", "UniformSigma"]

# Far above float64 rounding of u * T (~T * 1e-16) and far below one step (1): any T < 1e7 is exact.
_ROUND_EPS = 1e-9


class UniformTimesteps(InverseCDFDistribution):
    """``t ~ U{0, ..., T-1}``, the DDPM default.

    Example::

        timesteps = UniformTimesteps(num_timesteps=1000)
        t, weight = timesteps.sample(64, device="cuda", generator=g)
    """

    discrete = True
    level_kind = "timestep"

    def __init__(self, num_timesteps: int = 1000) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"UniformTimesteps.num_timesteps={num_timesteps} must be >= 1.")
        self.num_timesteps = num_timesteps

    def icdf(self, u: Tensor) -> Tensor:
        # + _ROUND_EPS: a boundary u = t/T computed in float64 (e.g. 1 - 0.8 = 0.19999999999999996)
        # can land a hair below t after * T; floor would then give t - 1 and widen a restricted range.
        return (u.double() * self.num_timesteps + _ROUND_EPS).floor().long().clamp_(0, self.num_timesteps - 1)

    def cdf(self, level: Tensor) -> Tensor:
        return (level.double() + 1) / self.num_timesteps


class UniformSigma(InverseCDFDistribution):
    """Continuous sigma, uniform in ``ln sigma`` (``log_space=True``) or in sigma, on [sigma_min, sigma_max]."""

    discrete = False
    level_kind = "sigma"

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
