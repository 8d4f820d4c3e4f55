"""The diffusion math in pure torch (no Lightning import): processes, parametrizations,
weightings, targets and solvers."""

from .noise import EDMProcess, NoiseProcess, RectifiedFlowProcess, VPProcess
from .precondition import Parametrization, edm_coefficients
from .solvers import ddim, euler, heun, karras_sigmas
from .targets import RegressionTarget, StandardTarget
from .weighting import (
    ConstantWeighting,
    EDMWeighting,
    LossWeighting,
    MaxSNRWeighting,
    MinSNRWeighting,
    SNRWeighting,
    SoftMinSNRWeighting,
    TruncatedSNRWeighting,
    min_snr_weight,
)

__all__ = [
    "NoiseProcess", "VPProcess", "EDMProcess", "RectifiedFlowProcess", "Parametrization", "edm_coefficients",
    "heun", "euler", "ddim", "karras_sigmas", "RegressionTarget", "StandardTarget",
    "LossWeighting", "ConstantWeighting", "SNRWeighting", "MinSNRWeighting", "MaxSNRWeighting",
    "TruncatedSNRWeighting", "SoftMinSNRWeighting", "EDMWeighting", "min_snr_weight",
]
