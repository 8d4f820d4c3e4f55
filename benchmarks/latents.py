"""Latent diffusion costs: encode throughput, latent vs pixel step time, memory on large latent sets.

    python benchmarks/latents.py                        # ~5 min on 2 CPU cores, writes ~6.5 GB to a temp dir
    python benchmarks/latents.py --sizes-gb 0.5 2 8     # larger sets (the disk must hold them)

1. encode: images/s of ``lightning-diffusion encode``'s inner loop (read, encode, to numpy) for the
   shipped digits autoencoder (8x8 digits, batch 256) and for a diffusers AutoencoderKL with the
   Stable Diffusion VAE's architecture (random weights: only the cost is measured) on 64x64 RGB
   images, batch 8 (the real VAE encodes 512x512 images, 64x the pixels: on a GPU, not here).
2. step time: the latent_digits recipe's UNet on 4x4x4 digit latents against the quickstart's on
   8x8x1 digit pixels (same UNet settings, batch 128, fp32), Lightning Trainer without logging,
   steps/s after warm-up; rounds interleaved, median shown.
3. memory: synthetic latent sets of several sizes (4x32x32 latents, float32 mean and std, the
   size of 256x256 images through an f=8 VAE), each trained for 40 steps of batch 64 by a tiny UNet
   in a fresh process through LatentDataModule. Printed: the process's peak resident memory
   (VmHWM) and, at the end, its anonymous (RssAnon) and file-backed (RssFile, the mapped shards'
   pages, which the kernel can drop) resident memory. Flat across sizes = the set is not loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
LATENT = (4, 32, 32)


def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def encode_throughput(seconds: float) -> list[tuple[str, float]]:
    from diffusers import AutoencoderKL

    from lightning_diffusion.autoencoders import DigitsAutoencoder
    from lightning_diffusion.autoencoders.base import encode_batch
    from lightning_diffusion.autoencoders.diffusers import DiffusersAutoencoder
    from lightning_diffusion.data.image_sources import TensorSource, open_source

    rows = []
    digits = open_source("digits")
    rows.append(("digits autoencoder, 8x8 -> 4x4x4, batch 256", _rate(digits, DigitsAutoencoder().frozen(), 256,
                                                                      seconds)))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        sd_like = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                block_out_channels=(128, 256, 512, 512),
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        sd_like.save_pretrained(folder)
        vae = DiffusersAutoencoder(folder).frozen()
        images = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8)
        source = TensorSource(images, None, 0, {"kind": "random"}, None, "benchmark")
        rows.append(("SD-VAE architecture (random weights), 64x64 -> 4x8x8, batch 8", _rate(source, vae, 8, seconds)))
    del encode_batch
    return rows


def _rate(source, autoencoder, batch: int, seconds: float) -> float:
    from lightning_diffusion.autoencoders.base import encode_batch

    done, start, index = 0, time.perf_counter(), 0
    images, _ = source.read(0, batch)
    encode_batch(autoencoder, images)  # warm-up
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        stop = min(index + batch, len(source))
        images, _ = source.read(index, stop)
        mean, std = encode_batch(autoencoder, images)
        mean.numpy(), std.numpy()
        done += stop - index
        index = 0 if stop == len(source) else stop
    return done / (time.perf_counter() - start)


class _Clock:
    """Steps/s between the end of step ``warmup`` and the end of the last step."""

    def __new__(cls, warmup: int):
        import lightning.pytorch as pl

        class Clock(pl.Callback):
            def __init__(self) -> None:
                self.start = self.end = 0.0
                self.steps = 0

            def on_train_batch_end(self, trainer, *args) -> None:
                if trainer.global_step == warmup:
                    self.start = time.perf_counter()
                elif trainer.global_step > warmup:
                    self.end, self.steps = time.perf_counter(), trainer.global_step - warmup

        return Clock()


def step_rate(latent: bool, steps: int, root: Path) -> float:
    import lightning.pytorch as pl

    from lightning_diffusion import DiffusionLightningModule
    from lightning_diffusion.core.weighting import MinSNRWeighting
    from lightning_diffusion.data import DigitsDataModule, LatentDataModule
    from lightning_diffusion.networks import UNet

    if latent:
        dm = LatentDataModule(str(root / "digits_latents"), batch_size=128, encode_from="digits")
        net = UNet(in_channels=4, image_size=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(2,), num_classes=10)
    else:
        dm = DigitsDataModule(batch_size=128)
        net = UNet(in_channels=1, image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), num_classes=10)
    torch.manual_seed(0)
    module = DiffusionLightningModule(net, prediction="v", weighting=MinSNRWeighting(5.0), num_classes=10,
                                      label_dropout=0.1)
    clock = _Clock(10)
    trainer = pl.Trainer(max_steps=10 + steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         log_every_n_steps=10**6, callbacks=[clock], default_root_dir=root)
    trainer.fit(module, datamodule=dm)
    return clock.steps / (clock.end - clock.start)


def write_synthetic(root: Path, gigabytes: float, shard_size: int = 4096) -> int:
    """A finished encode of random moments (the digits autoencoder's spec: 4 latent channels)."""
    from lightning_diffusion.autoencoders import DigitsAutoencoder
    from lightning_diffusion.data.latent_shards import FORMAT, MANIFEST, NORMALIZATION, write_json, write_shard

    per_image = 2 * 4 * int(np.prod(LATENT))
    count = int(gigabytes * 1e9 // per_image)
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    write_json(root / MANIFEST, {"format": FORMAT, "autoencoder": DigitsAutoencoder().spec(),
                                 "source": {"kind": "synthetic", "count": count, "num_classes": 10,
                                            "image_shape": [1, 64, 64]},
                                 "count": count, "shard_size": shard_size, "latent_shape": list(LATENT),
                                 "dtype": "float32"})
    for index, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        mean = rng.standard_normal((n, *LATENT), dtype=np.float32)
        std = np.full((n, *LATENT), 0.1, dtype=np.float32)
        write_shard(root, index, mean, std, rng.integers(0, 10, n), "float32")
    # exact for these draws' distribution: mean 0, variance 1 + 0.1^2 (docs/algorithms.md eq. 8.1)
    write_json(root / NORMALIZATION, {"mean": [0.0] * 4, "std": [float(np.sqrt(1.01))] * 4})
    return count


def memory_child(path: str) -> None:
    """Train 40 steps on the set at ``path``; print the memory figures as JSON."""
    _quiet()
    import lightning.pytorch as pl

    from lightning_diffusion import DiffusionLightningModule
    from lightning_diffusion.data import LatentDataModule
    from lightning_diffusion.networks import UNet

    dm = LatentDataModule(path, batch_size=64)
    net = UNet(in_channels=4, image_size=32, model_channels=8, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_classes=10)
    module = DiffusionLightningModule(net, num_classes=10)
    pl.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, limit_val_batches=2, val_check_interval=40, check_val_every_n_epoch=None,
               num_sanity_val_steps=0, default_root_dir=tempfile.mkdtemp()).fit(module, datamodule=dm)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    print(json.dumps({key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "RssAnon", "RssFile")}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.0, 4.0])
    p.add_argument("--encode-seconds", type=float, default=10.0, help="timed seconds per autoencoder")
    p.add_argument("--steps", type=int, default=100, help="timed steps per step-time run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tmp", default=None, help="where the synthetic sets go (default: the system temp dir)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    _quiet()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print("\n1. encode throughput (images/s)")
    for name, rate in encode_throughput(args.encode_seconds):
        print(f"   {name:70} {rate:10.1f}")

    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        root = Path(folder)
        print(f"\n2. step time, batch 128, {args.steps} steps after 10, {args.rounds} rounds (steps/s)")
        rates = {"pixels 1x8x8": [], "latents 4x4x4": []}
        for r in range(args.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            for latent in order:
                rates["latents 4x4x4" if latent else "pixels 1x8x8"].append(step_rate(latent, args.steps, root))
        medians = {k: statistics.median(v) for k, v in rates.items()}
        for name, values in rates.items():
            print(f"   {name:16} median {medians[name]:6.2f}   rounds {', '.join(f'{v:.2f}' for v in values)}")
        print(f"   latent / pixel step rate: {medians['latents 4x4x4'] / medians['pixels 1x8x8']:.2f}x")

        print(f"\n3. memory of a 40-step fit on synthetic {LATENT[0]}x{LATENT[1]}x{LATENT[2]} latent sets (MiB)")
        print(f"   {'set':>8} {'images':>9} {'VmHWM':>8} {'RssAnon':>8} {'RssFile':>8}")
        for size in args.sizes_gb:
            path = root / f"set_{size}"
            count = write_synthetic(path, size)
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(path)], capture_output=True,
                                 text=True, check=True)
            memory = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"   {size:6.1f}GB {count:9d} {memory['VmHWM']:8.0f} {memory['RssAnon']:8.0f} "
                  f"{memory['RssFile']:8.0f}", flush=True)
            for file in path.iterdir():
                file.unlink()
            path.rmdir()


if __name__ == "__main__":
    main()
