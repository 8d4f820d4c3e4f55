"""lightning-diffusion: faster-converging diffusion training for PyTorch Lightning."""

__version__ = "0.1.0"

from .core.noise import EDMProcess, RectifiedFlowProcess, VPProcess
from .core.weighting import MinSNRWeighting, min_snr_weight
from .module import DiffusionLightningModule, NonFiniteLossError

__all__ = ["__version__", "DiffusionLightningModule", "NonFiniteLossError", "VPProcess", "EDMProcess", "RectifiedFlowProcess", "MinSNRWeighting",
           "min_snr_weight"]
