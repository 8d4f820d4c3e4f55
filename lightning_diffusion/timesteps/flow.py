"""Densities over the rectified-flow time ``t`` in [0, 1], kept apart from the loss weighting.

Stable Diffusion 3 (Esser et al. 2024) trains rectified flow with a logit-normal density over t, or
its "mode" density, and shifts t towards noise for larger images (docs/algorithms.md 6). Each is an
:class:`InverseCDFDistribution`, so the curriculum restricts it exactly and the loss-aware and
adaptive samplers wrap it; the shift wraps any of them and composes CDF and inverse CDF.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import InverseCDFDistribution
from .lognormal import normal_cdf, normal_icdf

__all__ = ["LogitNormalTimesteps", "ModeTimesteps", "ShiftedTimesteps", "shift_time", "unshift_time"]

def _check_t_density(base: object, name: str) -> None:
    if getattr(base, "level_kind", None) != "t":
        raise ValueError(f"{name} needs a density over the flow time t (LogitNormalTimesteps, ModeTimesteps, "
                         f"...); got {type(base).__name__}.")


class LogitNormalTimesteps(InverseCDFDistribution):
    """``t = sigmoid(mean + std z)``, ``z ~ N(0, 1)``; CDF ``Phi((logit t - mean) / std)`` (SD3: 0, 1).

    Example::

        timesteps = LogitNormalTimesteps(mean=0.0, std=1.0)
    """

    discrete = False
    level_kind = "t"

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(mean):
            raise ValueError(f"LogitNormalTimesteps.mean={mean} must be a finite number.")
        if not std > 0 or not math.isfinite(std):
            raise ValueError(f"LogitNormalTimesteps.std={std} must be > 0.")
        self.mean, self.std = float(mean), float(std)

    def icdf(self, u: Tensor) -> Tensor:
        return torch.sigmoid(self.mean + self.std * normal_icdf(u)).float()

    def cdf(self, level: Tensor) -> Tensor:
        t = level.double().clamp(1e-300, 1 - 1e-16)
        return normal_cdf((torch.log(t) - torch.log1p(-t) - self.mean) / self.std)


def _mode_map(u: Tensor, scale: float) -> Tensor:
    """SD3's ``f(u) = 1 - u - c (cos^2(pi u / 2) - 1 + u)``: decreasing from f(0) = 1 to f(1) = 0."""
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


class ModeTimesteps(InverseCDFDistribution):
    """SD3's "mode" density: ``t = f(u)`` for uniform ``u``, ``f`` as in :func:`_mode_map` (SD3: c = 1.29).

    ``scale=0`` is the uniform density on [0, 1] (the rectified-flow paper's). ``f`` is monotone for
    ``-1 <= scale < 2 / (pi - 2)``; the CDF is its inverse, found by bisection in float64.
    """

    discrete = False
    level_kind = "t"
    _MAX_SCALE = 2 / (math.pi - 2)

    def __init__(self, scale: float = 1.29) -> None:
        super().__init__()
        if not -1.0 <= scale < self._MAX_SCALE:
            raise ValueError(f"ModeTimesteps.scale={scale} must be in [-1, {self._MAX_SCALE:.4f}) so that the "
                             f"density is positive.")
        self.scale = float(scale)

    def icdf(self, u: Tensor) -> Tensor:
        # u increases with noise, and f decreases: t = f(1 - u).
        return _mode_map(1 - u.double(), self.scale).clamp(0, 1).float()

    def cdf(self, level: Tensor) -> Tensor:
        t = level.double().clamp(0, 1)
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):  # 2^-60 of [0, 1]: below float64's resolution of t
            mid = (lo + hi) / 2
            above = _mode_map(1 - mid, self.scale) > t
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        return (lo + hi) / 2


def shift_time(t: Tensor, shift: float) -> Tensor:
    """``t' = s t / (1 + (s - 1) t)`` (SD3's resolution shift; ``s = 1`` is the identity)."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: Tensor, shift: float) -> Tensor:
    """The inverse of :func:`shift_time`: ``t = t' / (s - (s - 1) t')``."""
    return t / (shift - (shift - 1) * t)


class ShiftedTimesteps(InverseCDFDistribution):
    """Any density over t, shifted towards noise: ``t' = s t / (1 + (s - 1) t)`` (docs/algorithms.md 6).

    Give ``shift`` directly, or ``image_size`` and ``base_size`` for SD3's resolution rule
    ``s = sqrt(pixels / base_pixels) = image_size / base_size`` (square images). The shift is
    monotone, so the shifted CDF is the base CDF of the unshifted time and a curriculum's
    restriction means the same noise fraction with or without it.

    Example::

        timesteps = ShiftedTimesteps(LogitNormalTimesteps(), image_size=1024, base_size=256)  # s = 4
    """

    discrete = False
    level_kind = "t"

    def __init__(self, base: InverseCDFDistribution, shift: float | None = None, image_size: int | None = None,
                 base_size: int | None = None) -> None:
        super().__init__()
        _check_t_density(base, "ShiftedTimesteps.base")
        if shift is None:
            if image_size is None or base_size is None:
                raise ValueError("ShiftedTimesteps needs shift, or image_size and base_size to compute it.")
            if image_size <= 0 or base_size <= 0:
                raise ValueError(f"ShiftedTimesteps.image_size={image_size} and base_size={base_size} must be > 0.")
            shift = image_size / base_size
        elif image_size is not None or base_size is not None:
            raise ValueError("ShiftedTimesteps takes shift or image_size/base_size, not both.")
        if not shift > 0 or not math.isfinite(shift):
            raise ValueError(f"ShiftedTimesteps.shift={shift} must be > 0 (1 leaves t unchanged).")
        self.base, self.shift = base, float(shift)

    def icdf(self, u: Tensor) -> Tensor:
        return shift_time(self.base.icdf(u).double(), self.shift).float()

    def cdf(self, level: Tensor) -> Tensor:
        return self.base.cdf(unshift_time(level.double().clamp(0, 1), self.shift))
