"""Networks: ``net(x, noise_level, class_labels=None) -> Tensor`` modules for DiffusionLightningModule."""

from lightning_diffusion.networks.dit import DIT_SIZES, DiT
from lightning_diffusion.networks.edm2_unet import EDM2_PRESETS, EDM2UNet
from lightning_diffusion.networks.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from lightning_diffusion.networks.uncertainty import UncertaintyHead, uncertainty_noise_level
from lightning_diffusion.networks.unet import UNet

__all__ = ["UNet", "EDM2UNet", "EDM2_PRESETS", "DiT", "DIT_SIZES", "UncertaintyHead", "uncertainty_noise_level",
           "MPConv", "MPFourier", "mp_cat", "mp_silu", "mp_sum", "normalize"]
