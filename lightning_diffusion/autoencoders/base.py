"""The autoencoder interface latent diffusion trains through (docs/latents.md).

An autoencoder maps images ``[B, C, H, W]`` in [-1, 1] to a diagonal Gaussian over latents
``[B, c, H / f, W / f]`` (``encode`` returns its mean and standard deviation) and latents back to
images (``decode``). Encoding stores both moments, as EDM2 does, so training draws a fresh latent
``mean + std * noise`` each epoch; a deterministic encoder returns ``std = 0``.

Every implementation is rebuilt from a plain, named description (:meth:`Autoencoder.spec`): shard
manifests and checkpoints store that description, never a class path, so loading a user's files
imports nothing they name (:func:`build_autoencoder`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["AUTOENCODERS", "Autoencoder", "autoencoder_from_option", "build_autoencoder", "register_autoencoder"]

# name -> factory(**args); filled by the implementations' modules (autoencoders/__init__.py imports them)
AUTOENCODERS: dict[str, Callable[..., "Autoencoder"]] = {}


def register_autoencoder(name: str) -> Callable[[type], type]:
    """Class decorator: make ``name`` rebuildable by :func:`build_autoencoder`."""

    def register(cls: type) -> type:
        AUTOENCODERS[name] = cls
        return cls

    return register


class Autoencoder(nn.Module, ABC):
    """Images <-> latent moments. Subclasses set the three sizes and implement ``encode``/``decode``/``spec``.

    Attributes:
        image_channels: channels of the images it encodes.
        latent_channels: channels of its latents.
        downsample: spatial factor ``f`` (latent side = image side / f).
    """

    image_channels: int
    latent_channels: int
    downsample: int

    @abstractmethod
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the latent posterior, each ``[B, latent_channels, H / f, W / f]``, float32."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, image_channels, H, W]`` in about [-1, 1] (not clamped) from raw latents."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """``{"name": registered name, "args": plain keyword arguments}`` that rebuild this autoencoder."""

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent ``(c, h, w)`` of images ``(C, H, W)``; one sentence when they do not fit."""
        channels, height, width = image_shape
        name = type(self).__name__
        if channels != self.image_channels:
            raise ValueError(f"{name}: images have {channels} channels; this autoencoder encodes "
                             f"{self.image_channels}-channel images.")
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"{name}: images of {height}x{width} are not divisible by its downsampling factor "
                             f"{self.downsample}; resize them to a multiple of {self.downsample}.")
        return self.latent_channels, height // self.downsample, width // self.downsample

    def frozen(self) -> "Autoencoder":
        """This autoencoder in eval mode without gradients (it is never trained with the diffusion model)."""
        self.eval()
        self.requires_grad_(False)
        return self


def build_autoencoder(spec: dict[str, Any], setting: str = "autoencoder") -> Autoencoder:
    """Rebuild an autoencoder from :meth:`Autoencoder.spec`, only among the registered names."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("args", {}), dict):
        raise ValueError(f"{setting}: {spec!r} is not an autoencoder description; give "
                         '{"name": ..., "args": {...}}.')
    factory = AUTOENCODERS.get(spec["name"])
    if factory is None:
        raise ValueError(f"{setting}: unknown autoencoder {spec['name']!r}; known: {sorted(AUTOENCODERS)}.")
    return factory(**spec.get("args", {})).frozen()


@torch.no_grad()
def encode_batch(autoencoder: Autoencoder, images: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of a batch as float32, shape-checked (a wrong implementation is named, not silently stored)."""
    mean, std = autoencoder.encode(images)
    expected = (images.shape[0], *autoencoder.latent_shape(tuple(images.shape[1:])))
    for what, value in (("mean", mean), ("std", std)):
        if tuple(value.shape) != expected:
            raise ValueError(f"{type(autoencoder).__name__}.encode returned a {what} of shape {tuple(value.shape)}; "
                             f"expected {expected}.")
    return mean.float(), std.float()


def autoencoder_from_option(value: str, subfolder: str | None = None, dtype: str = "float32",
                            setting: str = "autoencoder") -> Autoencoder:
    """``digits`` -> the shipped digits autoencoder; anything else -> a local diffusers AutoencoderKL folder."""
    if value == "digits":
        return build_autoencoder({"name": "DigitsAutoencoder", "args": {}}, setting)
    try:
        return build_autoencoder({"name": "DiffusersAutoencoder",
                                  "args": {"path": value, "subfolder": subfolder, "dtype": dtype}}, setting)
    except (ValueError, FileNotFoundError) as error:  # name the option the user typed, not the class's argument
        raise type(error)(str(error).replace("DiffusersAutoencoder.path", setting, 1)) from None
