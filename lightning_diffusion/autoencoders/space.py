"""The latent space a model trains in: an autoencoder and the normalization of its latents (docs/algorithms.md eq. 8.2).

Training data is ``x = (z - shift) * scale`` per channel, with ``shift`` the latents' mean and
``scale = target_std / std`` (docs/algorithms.md eq. 8.2), so the diffusion process sees data at the
scale its schedule expects; :meth:`LatentSpace.decode` undoes it and runs the decoder. The module
keeps a ``LatentSpace`` out of its ``state_dict`` (the autoencoder is frozen and may be large) and
stores :meth:`LatentSpace.state` (plain values) in the checkpoint instead, so ``validate`` and
``predict`` from a checkpoint decode with the same autoencoder and normalization.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_diffusion.autoencoders.base import Autoencoder, build_autoencoder

__all__ = ["LatentSpace"]


class LatentSpace:
    """``autoencoder`` plus per-channel ``shift`` and ``scale`` (lists of ``latent_channels`` floats).

    Example::

        space = LatentSpace(DigitsAutoencoder(), shift=[0.1] * 4, scale=[0.7] * 4)
        images = space.decode(x)  # x: [B, 4, 4, 4] normalized latents -> [B, 1, 8, 8] images
    """

    def __init__(self, autoencoder: Autoencoder, shift: list[float], scale: list[float]) -> None:
        channels = autoencoder.latent_channels
        if len(shift) != channels or len(scale) != channels:
            raise ValueError(f"LatentSpace: {len(shift)} shifts and {len(scale)} scales for an autoencoder with "
                             f"{channels} latent channels; give one of each per channel.")
        if not all(s > 0 for s in scale):
            raise ValueError(f"LatentSpace: scales {scale} must all be positive.")
        self.autoencoder = autoencoder.frozen()
        self.shift = [float(v) for v in shift]
        self.scale = [float(v) for v in scale]

    @classmethod
    def from_stats(cls, autoencoder: Autoencoder, stats: dict[str, list[float]], target_std: float) -> "LatentSpace":
        """From the per-channel ``mean``/``std`` that ``encode`` wrote (normalization.json), docs/algorithms.md eq. 8.2."""
        if not target_std > 0:
            raise ValueError(f"LatentDataModule.target_std: got {target_std}; give a positive number.")
        return cls(autoencoder, stats["mean"], [target_std / max(s, 1e-12) for s in stats["std"]])

    def _coefficients(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1)
        shift = torch.tensor(self.shift, dtype=torch.float32, device=like.device).view(shape)
        scale = torch.tensor(self.scale, dtype=torch.float32, device=like.device).view(shape)
        return shift, scale

    def normalize(self, latents: Tensor) -> Tensor:
        """Raw latents -> the data the model trains on."""
        shift, scale = self._coefficients(latents)
        return (latents.float() - shift) * scale

    def denormalize(self, x: Tensor) -> Tensor:
        """The model's data -> raw latents."""
        shift, scale = self._coefficients(x)
        return x.float() / scale + shift

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Images from normalized latents, on ``x``'s device (the autoencoder follows it there)."""
        first = next(self.autoencoder.parameters(), None)
        if first is not None and first.device != x.device:
            self.autoencoder.to(x.device)
        return self.autoencoder.decode(self.denormalize(x)).float()

    def state(self) -> dict[str, Any]:
        """Plain values for a checkpoint (``torch.load(weights_only=True)`` reads them)."""
        return {"autoencoder": self.autoencoder.spec(), "shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_state(cls, state: dict[str, Any], setting: str = "checkpoint") -> "LatentSpace":
        """Rebuild from :meth:`state`; only registered autoencoders are built (nothing named is imported)."""
        return cls(build_autoencoder(state["autoencoder"], setting), state["shift"], state["scale"])

    def same_as(self, other: "LatentSpace") -> bool:
        return self.state() == other.state()
