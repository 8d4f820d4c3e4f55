"""The shipped digits autoencoder: a small convolutional KL autoencoder for the embedded 8x8 digits.

It maps grey images ``[B, 1, 8, 8]`` in [-1, 1] to a diagonal Gaussian over latents ``[B, 4, 4, 4]``
(downsampling factor 2: 64 latent numbers for 64 pixels), so latent diffusion can be tried on the
default data set without a download. The weights
are ``assets/digits_autoencoder.pt``, a plain tensor state dict rebuilt by
``scripts/train_digits_autoencoder.py`` and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusion.autoencoders.base import Autoencoder, register_autoencoder

__all__ = ["DIGITS_AUTOENCODER_WEIGHTS", "DigitsAutoencoder", "DigitsAutoencoderNet"]

DIGITS_AUTOENCODER_WEIGHTS = Path(__file__).resolve().parent / "assets" / "digits_autoencoder.pt"

# Stable Diffusion's DiagonalGaussianDistribution bounds: a fresh or odd encoder cannot return a
# std of exactly 0 or an overflowing one, while every std a trained net uses lies well inside.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# the global torch.load(weights_only=True) refused, in its error message
_REFUSED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class DigitsAutoencoderNet(nn.Module):
    """The trainable network behind :class:`DigitsAutoencoder` (the training script builds it bare).

    Encoder: 8x8 -> two 3x3 convs -> stride-2 conv -> 4x4 -> conv -> 1x1 conv to mean and log-variance.
    Decoder: the mirror image with nearest upsampling. SiLU throughout; the output is linear (not
    clamped), as the interface asks.
    """

    def __init__(self, image_channels: int = 1, latent_channels: int = 4, width: int = 32) -> None:
        super().__init__()
        half = width // 2
        self.encoder = nn.Sequential(
            nn.Conv2d(image_channels, half, 3, padding=1), nn.SiLU(),
            nn.Conv2d(half, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),  # 8x8 -> 4x4
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * latent_channels, 1),  # mean and log-variance
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),  # 4x4 -> 8x8
            nn.Conv2d(width, half, 3, padding=1), nn.SiLU(),
            nn.Conv2d(half, half, 3, padding=1), nn.SiLU(),
            nn.Conv2d(half, image_channels, 3, padding=1),
        )

    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and clamped log-variance of images."""
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: Tensor) -> Tensor:
        """Images from latents (not clamped)."""
        return self.decoder(latents)


@register_autoencoder("DigitsAutoencoder")
class DigitsAutoencoder(Autoencoder):
    """Shipped KL autoencoder for the embedded digits: ``[B,1,8,8]`` <-> latents ``[B,4,4,4]``.

    ``weights=None`` loads the shipped asset; a path loads a state dict written by
    ``scripts/train_digits_autoencoder.py`` instead (safely: plain tensors only). The network is a
    few tens of thousands of parameters, so building one costs milliseconds. It is convolutional,
    so 16x16 images give 4x8x8 latents, but it was trained at 8x8 only.

    Example::

        autoencoder = DigitsAutoencoder().frozen()
        mean, std = autoencoder.encode(images)  # each [B, 4, 4, 4]
        reconstructions = autoencoder.decode(mean)  # [B, 1, 8, 8], about [-1, 1]
    """

    image_channels = 1
    latent_channels = 4
    downsample = 2

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        if weights is not None and not isinstance(weights, (str, Path)):
            raise ValueError(f"DigitsAutoencoder.weights: {weights!r} is not a path; give the path of a state dict "
                             "written by scripts/train_digits_autoencoder.py, or None for the shipped weights.")
        # spec() must be plain data: keep the path as a string, and nothing when it is the default
        self.weights = None if weights is None else str(weights)
        self.net = DigitsAutoencoderNet(self.image_channels, self.latent_channels)
        self.net.load_state_dict(_load_state(Path(weights) if weights is not None else DIGITS_AUTOENCODER_WEIGHTS))

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the latent posterior, each ``[B, 4, H/2, W/2]``, float32."""
        if images.ndim != 4:
            raise ValueError(f"DigitsAutoencoder: images have shape {tuple(images.shape)}; give [B,1,H,W] images.")
        self.latent_shape(tuple(images.shape[1:]))  # one sentence for wrong channels or odd sizes
        mean, logvar = self.net.moments(images.float())
        return mean, torch.exp(0.5 * logvar)

    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 1, 2h, 2w]`` in about [-1, 1] (not clamped) from latents ``[B, 4, h, w]``."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"DigitsAutoencoder: latents have shape {tuple(latents.shape)}; "
                             f"give [B,{self.latent_channels},h,w] latents.")
        return self.net.decode(latents.float())

    def spec(self) -> dict[str, Any]:
        """``{"name": "DigitsAutoencoder", "args": {}}``, or ``{"weights": path}`` for other weights."""
        return {"name": "DigitsAutoencoder", "args": {} if self.weights is None else {"weights": self.weights}}


def _load_state(file: Path) -> dict[str, Tensor]:
    """The state dict at ``file``, loaded without running code; one sentence for anything else."""
    allowed = "give a state dict written by scripts/train_digits_autoencoder.py, or None for the shipped weights"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"DigitsAutoencoder.weights: '{file}' does not exist; {allowed}.") from error
    except Exception as error:  # any unreadable file gets the same sentence
        # weights_only refused a global (the file may be crafted), or the file is no torch save at all
        # (the unpickler then fails with whatever byte it met). torch's own message advises
        # weights_only=False, which is exactly wrong here: name only what was refused.
        refused = _REFUSED.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        why = (f"it holds {refused.group(1)}, which weights_only loading refuses" if refused
               else "torch.load cannot read it")
        raise ValueError(f"DigitsAutoencoder.weights: '{file}' is not a plain tensor state dict ({why}); "
                         f"{allowed}.") from error
    expected = DigitsAutoencoderNet().state_dict()
    if (not isinstance(state, dict) or set(state) != set(expected)
            or any(not isinstance(state[k], Tensor) or state[k].shape != v.shape for k, v in expected.items())):
        raise ValueError(f"DigitsAutoencoder.weights: '{file}' does not hold this autoencoder's weights "
                         f"(other keys or shapes); {allowed}.")
    return state
