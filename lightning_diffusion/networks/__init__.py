"""Networks: ``net(x, noise_level, class_labels=None) -> Tensor`` modules for DiffusionLightningModule."""

from lightning_diffusion.networks.unet import UNet

__all__ = ["UNet"]
