"""Network throughput: EDM2 UNet and DiT next to a conventional UNet of similar parameter count.

    python benchmarks/networks.py --quick                  # tiny size only, ~20 s on 2 CPU cores
    python benchmarks/networks.py                          # tiny and S sizes (S is minutes on a CPU)
    python benchmarks/networks.py --device cuda --precision bf16 --s-batch-size 64

Each row times one forward + backward pass (loss = mean square of the output, no optimizer step)
on random inputs and noise levels: ``ms/iter`` is the median over ``--rounds`` rounds of
``--iters`` timed iterations after ``--warmup`` untimed ones (the CUDA device is synchronized
before each clock read); ``images/s = batch / (ms/iter)``; ``ratio`` is images/s relative to the
conventional UNet of the same size (higher is faster).

Sizes:
  tiny  8x8x1 (the embedded digits): EDM2UNet model_channels 32, channel_mult (1, 2), 1 block,
        attention at 4; DiT tiny/2 (hidden 64, depth 4).
  S     32x32x4 latents (DiT's 256-pixel setting; EDM2's own S runs at 64x64, ``--s-image-size``):
        EDM2-S (model_channels 192, channel_mult (1, 2, 3, 4), 3 blocks, attention at 16 and 8,
        280M parameters); DiT-S/2 (33M).
The conventional UNet (``networks/unet.py``) uses the EDM2 net's channel_mult, blocks and
attention resolutions, with ``model_channels`` (a multiple of 8) chosen so its parameter count is
closest to the EDM2 net's; the DiT is shown at its paper size, so its ratio is not at equal size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_diffusion.networks import DIT_SIZES, EDM2_PRESETS, DiT, EDM2UNet, UNet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny size only, few iterations")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="32", choices=["32", "bf16"], help="bf16: autocast")
    p.add_argument("--tiny-batch-size", type=int, default=64)
    p.add_argument("--s-batch-size", type=int, default=4)
    p.add_argument("--s-image-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.iters, args.rounds = min(args.iters, 10), min(args.rounds, 2)
    return args


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def matched_unet(target: int, channels: int, image_size: int, channel_mult: tuple[int, ...], blocks: int,
                 attention: tuple[int, ...]) -> Callable[[], UNet]:
    """A builder of the conventional UNet whose parameter count is closest to ``target`` (counted on meta)."""
    def build(mc: int) -> UNet:
        heads = max(mc // 64, 1) if mc % 64 == 0 else 1
        return UNet(in_channels=channels, image_size=image_size, model_channels=mc, channel_mult=channel_mult,
                    num_res_blocks=blocks, attention_resolutions=attention, num_heads=heads, num_groups=8)
    with torch.device("meta"):
        best = min(range(8, 513, 8), key=lambda mc: abs(count(build(mc)) - target))
    return lambda: build(best)


def builders(size: str, args: argparse.Namespace) -> tuple[tuple[int, int, int], dict[str, Callable[[], nn.Module]]]:
    """Input shape (C, H, W) and the three networks of a size."""
    if size == "tiny":
        shape, mult, blocks, attn = (1, 8, 8), (1, 2), 1, (4,)
        edm2 = dict(model_channels=32, channels_per_head=32)
        dit = dict(patch_size=2, **DIT_SIZES["tiny"])
    else:
        shape, mult, blocks, attn = (4, args.s_image_size, args.s_image_size), (1, 2, 3, 4), 3, (16, 8)
        edm2 = dict(model_channels=EDM2_PRESETS["S"], channels_per_head=64)
        dit = dict(patch_size=2, **DIT_SIZES["S"])
    c, h, _ = shape

    def make_edm2() -> EDM2UNet:
        return EDM2UNet(in_channels=c, image_size=h, channel_mult=mult, num_blocks=blocks,
                        attention_resolutions=attn, **edm2)

    with torch.device("meta"):
        target = count(make_edm2())
    return shape, {
        "UNet (conventional)": matched_unet(target, c, h, mult, blocks, attn),
        "EDM2UNet": make_edm2,
        "DiT": lambda: DiT(in_channels=c, image_size=h, **dit),
    }


def time_net(net: nn.Module, shape: tuple[int, int, int], batch: int, args: argparse.Namespace) -> float:
    """Median milliseconds of one forward + backward pass."""
    device = torch.device(args.device)
    x = torch.randn(batch, *shape, device=device)
    level = torch.randn(batch, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = net(x, level)
        out.float().square().mean().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    rounds = []
    for _ in range(args.rounds):
        sync()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        sync()
        rounds.append((time.perf_counter() - start) / args.iters * 1000)
    return statistics.median(rounds)


def main() -> None:
    args = parse_args()
    print(f"device={args.device} precision={args.precision} threads={torch.get_num_threads()} "
          f"load={os.getloadavg()[0]:.2f}")
    print(f"{'size':5} {'network':20} {'input':>12} {'params':>10} {'ms/iter':>9} {'images/s':>9} {'ratio':>6}")
    for size in ["tiny"] if args.quick else ["tiny", "S"]:
        shape, nets = builders(size, args)
        batch = args.tiny_batch_size if size == "tiny" else args.s_batch_size
        rows = []
        for name, build in nets.items():
            torch.manual_seed(0)
            net = build().to(args.device)
            rows.append((name, count(net), time_net(net, shape, batch, args)))
            del net
        base = batch * 1000 / rows[0][2]  # the conventional UNet's images/s
        for name, params, ms in rows:
            ips = batch * 1000 / ms
            print(f"{size:5} {name:20} {f'{batch}x' + 'x'.join(map(str, shape)):>12} {params / 1e6:9.2f}M "
                  f"{ms:9.1f} {ips:9.0f} {ips / base:6.2f}")
    print(f"load={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
