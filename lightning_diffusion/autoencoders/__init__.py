"""Autoencoders for latent diffusion (docs/latents.md): the interface, the shipped digits one, diffusers' AutoencoderKL."""

from lightning_diffusion.autoencoders.base import (Autoencoder, autoencoder_from_option, build_autoencoder,
                                                   register_autoencoder)
from lightning_diffusion.autoencoders.diffusers import DiffusersAutoencoder
from lightning_diffusion.autoencoders.digits import DigitsAutoencoder
from lightning_diffusion.autoencoders.space import LatentSpace

__all__ = ["Autoencoder", "autoencoder_from_option", "DiffusersAutoencoder", "DigitsAutoencoder", "LatentSpace", "build_autoencoder",
           "register_autoencoder"]
