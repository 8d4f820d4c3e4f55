"""Training-time distributions over noise levels (pure torch, no Lightning)."""

from .adaptive import AdaptiveTimesteps, TimestepPolicy
from .base import InverseCDFDistribution, LearnedSampler, TimestepDistribution, check_restriction
from .flow import LogitNormalTimesteps, ModeTimesteps, ShiftedTimesteps
from .curriculum import FixedPacer, PatiencePacer, cluster_bounds, stage_support
from .importance import LossAwareTimesteps
from .lognormal import LogNormalSigma
from .uniform import UniformSigma, UniformTimesteps

__all__ = ["TimestepDistribution", "InverseCDFDistribution", "LearnedSampler", "check_restriction",
           "UniformTimesteps", "UniformSigma", "LogNormalSigma",
           "LogitNormalTimesteps", "ModeTimesteps", "ShiftedTimesteps",
           "FixedPacer", "PatiencePacer", "cluster_bounds", "stage_support",
           "AdaptiveTimesteps", "TimestepPolicy", "LossAwareTimesteps"]
