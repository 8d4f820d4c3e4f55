"""The noise of a training draw, with offset noise and input perturbation (docs/algorithms.md 6).

* Offset noise (Guttenberg 2023): ``eps' = eps + c delta`` with ``delta ~ N(0, 1)`` per sample and
  channel, constant over the pixels, used in the noisy input and in the target alike, so the
  network learns to change an image's mean brightness too.
* Input perturbation (Ning et al. 2023): the noisy input is built from ``eps + g xi`` while the
  target keeps ``eps``, which imitates at training time the error a sampler makes at test time.

Both apply to every process (VP, EDM, rectified flow); with both off a draw is one ``randn``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["training_noise", "check_strength"]


def check_strength(name: str, value: float) -> float:
    """``value`` as a float, or one sentence naming ``name`` if it is negative or not finite."""
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name}={value} must be a finite number >= 0 (0 turns it off; the paper uses 0.1).")
    return float(value)


def training_noise(x0: Tensor, generator: torch.Generator | None, offset_noise: float = 0.0,
                   input_perturbation: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """``(noise, input_noise)``: ``noise`` enters the target (and the input); ``input_noise`` is the
    input's own noise under input perturbation, else None."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset_noise:
        shape = (*x0.shape[:2], *([1] * (x0.ndim - 2)))  # one offset per sample and channel
        noise = noise + offset_noise * torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if not input_perturbation:
        return noise, None
    xi = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return noise, noise + input_perturbation * xi
