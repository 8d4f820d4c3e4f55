"""EDM2 learned uncertainty weighting, docs/algorithms.md 3.2.

Per-sample loss ``lambda(sigma)/exp(u(sigma)) * err + u(sigma)`` with ``u = MPConv(MPFourier(c_noise))``,
one scalar per sample, trained with the network. For fixed errors the optimum is
``u* = ln(lambda * err)``, so the head learns the log of the expected weighted error per noise
level and the effective weight ``lambda/exp(u)`` equalizes the loss across levels.

**(choice)** ``err`` is the per-sample *mean* squared error over elements (the library's ``mse``),
not the sum as in the official code: the optimum is the same ``ln(lambda * mean err)`` and the
loss is 1/#elements as large, so learning rates carry over between image sizes.

The head reads a noise level that exists for every process (:func:`uncertainty_noise_level`),
so it works with any network and any process.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.noise import EDMProcess, NoiseProcess
from .mp import MPConv, MPFourier

__all__ = ["UncertaintyHead", "uncertainty_noise_level", "uncertainty_loss"]

# SNR range kept finite for the VP mapping: zero-terminal-SNR schedules reach SNR == 0 (c = +2.9 at 1e-10).
_SNR_MIN, _SNR_MAX = 1e-10, 1e10


def uncertainty_noise_level(process: NoiseProcess, level: Tensor) -> Tensor:
    """The head's input, fp32 [B]: EDM's ``c_noise = ln(sigma)/4``; VP: the same of ``sigma = 1/sqrt(SNR)``.

    A VP sample with SNR(t) has the noise-to-signal ratio of an EDM sample with
    ``sigma^2 = 1/SNR``, so ``ln(sigma)/4 = -ln(SNR)/8``; SNR is clamped to [1e-10, 1e10] so
    t = T-1 of a zero-terminal-SNR schedule stays finite.
    """
    if isinstance(process, EDMProcess):
        return level.float().log() / 4
    snr = process.snr(level).float().clamp(_SNR_MIN, _SNR_MAX)
    return -0.125 * snr.log()


def uncertainty_loss(weighted_err: Tensor, u: Tensor) -> Tensor:
    """``weighted_err / exp(u) + u`` per sample (docs/algorithms.md 3.2), minimal at ``u = ln(weighted_err)``."""
    return weighted_err * torch.exp(-u) + u


class UncertaintyHead(nn.Module):
    """``u(c_noise) = MPConv(MPFourier(c_noise))``: one log-variance per sample, [B] in fp32.

    Give it to ``DiffusionLightningModule(uncertainty=UncertaintyHead())``; the module feeds it
    :func:`uncertainty_noise_level` outside autocast and trains it with the network's optimizer.

    Example::

        head = UncertaintyHead(channels=128)
        u = head(torch.log(sigma) / 4)              # [B]
        loss = uncertainty_loss(weight * mse, u).mean()
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.fourier = MPFourier(channels)
        self.linear = MPConv(channels, 1, kernel=())

    def forward(self, c_noise: Tensor) -> Tensor:
        return self.linear(self.fourier(c_noise.float())).reshape(-1)
