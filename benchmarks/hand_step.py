"""The diffusion loss of DiffusionLightningModule.training_step, written out in plain PyTorch.

The hand-written loops of throughput.py and gpu_check.py call this, so both compare the library
with the same hand-written step: t and importance weight from the density, noise, x_t, the
standard target, the forward pass, per-sample MSE times the weighting (fp32, outside autocast).
"""

from __future__ import annotations

import torch
from torch import Tensor


def hand_loss(net: torch.nn.Module, param, weighting, timesteps, x0: Tensor, generator: torch.Generator,
              bf16: bool) -> Tensor:
    """One training draw's loss on ``x0`` (unconditional), under bf16 autocast when ``bf16``."""
    device, process = x0.device, param.process
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        level, importance = timesteps.sample(x0.shape[0], device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        x_noisy = process.add_noise(x0, noise, level)
        with torch.no_grad():
            target = param.target(x0, noise, level)
        output = param.predict(net, x_noisy, level)
        mse = (output.float() - target.float()).square().flatten(1).mean(1)
        with torch.autocast(device.type, enabled=False):
            weight = weighting(process.snr(level), param.prediction)
        return (weight * mse * importance).mean()
