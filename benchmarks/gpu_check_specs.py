"""What gpu_check.py measures: the networks at their check sizes, their objective, FLOPs and the card's peak.

Sizes on a GPU follow the papers' training settings per device: the UNet at CIFAR size (32x32x3,
128 channels, batch 128), EDM2-XS and EDM2-S on 64x64x4 latents (ImageNet-512; batch 64 per GPU as
in EDM2's 2048 over 32 GPUs), DiT-B/2 on 32x32x4 latents (ImageNet-256; batch 256 as in the DiT
paper). ``--dry-run`` shrinks every net to a few thousand parameters at 8x8 so the CPU test of the
script runs in seconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.core.weighting import ConstantWeighting, EDMWeighting
from lightning_diffusion.data.base import ImageDataModule
from lightning_diffusion.networks import DiT, EDM2UNet, UNet


@dataclass(frozen=True)
class NetSpec:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, int, int]  # C, H, W of one training image
    batch: int
    edm: bool  # EDM process, x0 (denoiser) prediction, EDM weighting; else VP, eps, constant weight

    def objective(self) -> tuple[object, str, object]:
        """(process, prediction, weighting) of this net's paper, fresh objects each call."""
        if self.edm:
            weighting = EDMWeighting(sigma_data=0.5)
            process = EDMProcess(sigma_data=0.5)
            weighting.bind(process)
            return process, "x0", weighting
        return VPProcess("linear", 1000), "eps", ConstantWeighting()

    def optimizer(self, params) -> torch.optim.Optimizer:
        # EDM2: Adam(0.9, 0.99) without weight decay; DiT/DDPM: AdamW(1e-4). The LR value does not change the cost.
        if self.edm:
            return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def _edm2(channels: int, size: int) -> Callable[[], nn.Module]:
    return functools.partial(EDM2UNet, in_channels=4, image_size=size, model_channels=channels,
                             channel_mult=(1, 2, 3, 4), num_blocks=3, attention_resolutions=(16, 8))


def specs(dry_run: bool) -> list[NetSpec]:
    if dry_run:
        return [
            NetSpec("UNet", functools.partial(UNet, in_channels=3, image_size=8, model_channels=16,
                                              channel_mult=(1, 2), attention_resolutions=(4,)), (3, 8, 8), 8, False),
            NetSpec("EDM2UNet-XS", functools.partial(EDM2UNet, in_channels=4, image_size=8, model_channels=16,
                                                     channel_mult=(1, 2), attention_resolutions=(4,)),
                    (4, 8, 8), 8, True),
            NetSpec("EDM2UNet-S", functools.partial(EDM2UNet, in_channels=4, image_size=8, model_channels=24,
                                                    channel_mult=(1, 2), attention_resolutions=(4,)),
                    (4, 8, 8), 8, True),
            NetSpec("DiT-B/2", functools.partial(DiT, in_channels=4, image_size=8, hidden_size=32, depth=2,
                                                 num_heads=2), (4, 8, 8), 8, False),
        ]
    return [
        NetSpec("UNet", functools.partial(UNet, in_channels=3, image_size=32, model_channels=128,
                                          channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,)),
                (3, 32, 32), 128, False),
        NetSpec("EDM2UNet-XS", _edm2(128, 64), (4, 64, 64), 64, True),
        NetSpec("EDM2UNet-S", _edm2(192, 64), (4, 64, 64), 64, True),
        NetSpec("DiT-B/2", functools.partial(DiT, in_channels=4, image_size=32, patch_size=2, hidden_size=768,
                                             depth=12, num_heads=12), (4, 32, 32), 256, False),
    ]


class RandomImages(ImageDataModule):
    """``count`` random uint8 images of one shape, served like every in-memory data set of the package."""

    def __init__(self, shape: tuple[int, int, int], batch_size: int, count: int = 2048, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        self._set_data(torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=gen), None, 0)


def count_flops(spec: NetSpec, device: torch.device) -> int:
    """FLOPs of one forward + backward of the network on one batch, counted by torch (not estimated).

    Counted on two images and scaled to the batch (every op of these nets is per-image), so the
    count costs no memory of its own next to the runs it describes.
    """
    torch.manual_seed(0)
    net = spec.build().to(device)
    x = torch.randn(2, *spec.shape, device=device)
    level = torch.rand(2, device=device)
    with FlopCounterMode(display=False) as counter:
        net(x, level).float().square().mean().backward()
    return counter.get_total_flops() * spec.batch // 2


# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity). The first
# matching substring of torch.cuda.get_device_name() wins, so more specific names come first.
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0),
]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The card's dense bf16 peak, ``override`` if given; None on CPU or an unknown card (no MFU then)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)
