"""Stable Target Field cost: the target computation vs a naive [B, n, d] version and vs a training step.

    python benchmarks/stf_cost.py                 # quickstart UNet, batch 128, 8x8 digits; ~1 min on 2 CPU cores
    python benchmarks/stf_cost.py --device cuda --image-size 32 --channels 3

For n in {256, 1024, 4096} references it times ``stf_target`` (chunked matmul, the library's) and a
naive implementation that materializes ``x[:, None] - r[None]`` ([B, n, d]), and reports each as a
fraction of one training step of the quickstart network (UNet 32 channels, 0.76M parameters;
forward + backward + AdamW at the same batch, standard targets). Memory: the largest intermediate
each one allocates (computed from shapes: [B, n] logits + one chunk vs [B, n, d]) and, on CUDA, the
measured peak. Also times the full ``StableTargetField`` call with the fresh source (loading the
extra references from the in-memory set and the duplicate check), the number that matters in training.
Each timing is the median of ``--repeats`` calls after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_diffusion.core.noise import VPProcess
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.targets import StableTargetField, stf_target
from lightning_diffusion.core.weighting import MinSNRWeighting
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.networks import UNet


def naive_target(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """docs/algorithms.md 2 written directly: the [B, n, d] difference tensor."""
    xf, rf = x.flatten(1), refs.flatten(1)
    diff = xf[:, None, :] - a[:, None, None] * rf[None]
    weights = torch.softmax(-diff.square().sum(-1) / (2 * s[:, None] ** 2), 1)
    return (weights @ rf).reshape(x.shape)


def timed(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn, device: str) -> str:
    if device != "cuda":
        return "-"
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--naive-limit-gib", type=float, default=4.0, help="skip the naive version above this size")
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gen = torch.Generator().manual_seed(0)
    b, c, size = args.batch_size, args.channels, args.image_size
    d = c * size * size
    process = VPProcess(schedule="cosine")
    param = Parametrization(process, "v")

    net = UNet(in_channels=c, image_size=size, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x0 = torch.randn(b, c, size, size, generator=gen).to(device)
    t = torch.randint(0, 1000, (b,), generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    x_noisy = process.add_noise(x0, noise, t)
    weighting = MinSNRWeighting(5.0)

    def train_step() -> None:
        out = param.predict(net, x_noisy, t, None)
        mse = (out - param.target(x0, noise, t)).square().flatten(1).mean(1)
        loss = (weighting(process.snr(t), "v") * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = timed(train_step, device, args.repeats)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {b}, image {c}x{size}x{size} (d={d}), "
          f"UNet {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params: training step {step * 1e3:.1f} ms\n")
    a, s = process.alpha_sigma(t)
    print("| n | stf_target ms | % of step | largest intermediate MiB | naive ms | % of step | naive intermediate MiB "
          "| CUDA peak MiB (ours / naive) | StableTargetField(fresh) ms | % of step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        refs = torch.cat([x0, torch.randn(n - b, c, size, size, generator=gen).to(device)])
        ours = timed(lambda: stf_target(x_noisy, s, refs, scale=a), device, args.repeats)
        ours_mib = (b * n + min(n, 1024) * d + b * d) * 4 / 2**20
        naive_mib = b * n * d * 4 / 2**20
        if naive_mib / 1024 <= args.naive_limit_gib:
            naive = timed(lambda: naive_target(x_noisy, a, s, refs), device, args.repeats)
            naive_cols = f"{naive * 1e3:.2f} | {100 * naive / step:.1f}"
            peak_naive = peak_bytes(lambda: naive_target(x_noisy, a, s, refs), device)
        else:
            naive_cols, peak_naive = "skipped | -", "-"
        peak_ours = peak_bytes(lambda: stf_target(x_noisy, s, refs, scale=a), device)
        target = StableTargetField(reference_size=n, source="fresh")
        data = DigitsDataModule(batch_size=b, image_size=size if c == 1 else None)
        if c == 1:
            target.setup(type("M", (), {"trainer": type("T", (), {"datamodule": data})(), "global_rank": 0,
                                        "num_classes": 0})())
            full = timed(lambda: target(param, x0, noise, x_noisy, t), device, args.repeats)
            full_cols = f"{full * 1e3:.2f} | {100 * full / step:.1f}"
        else:
            full_cols = "- | -"
        print(f"| {n} | {ours * 1e3:.2f} | {100 * ours / step:.1f} | {ours_mib:.1f} | {naive_cols} | {naive_mib:.1f} "
              f"| {peak_ours} / {peak_naive} | {full_cols} |")


if __name__ == "__main__":
    main()
