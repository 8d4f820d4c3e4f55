"""Training-time distributions over noise levels (pure torch, no Lightning)."""

from .base import InverseCDFDistribution, TimestepDistribution
from .lognormal import LogNormalSigma
from .uniform import UniformSigma, UniformTimesteps

__all__ = ["TimestepDistribution", "InverseCDFDistribution", "UniformTimesteps", "UniformSigma", "LogNormalSigma"]
