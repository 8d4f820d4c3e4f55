"""Post-hoc EMA cost: PostHocEMA's update as a fraction of the training step, and snapshot sizes.

    python benchmarks/ema_cost.py                      # quickstart UNet, batch 128, ~1-2 min on 2 CPU cores
    python benchmarks/ema_cost.py --device cuda --steps 200

Trains the quickstart network (UNet 32 channels, channel_mult [1, 2], one res block, attention at
4x4; 0.76M parameters) on the embedded 8x8 digits, batch 128, VP cosine, v-prediction, Min-SNR-5,
AdamW, under a real Lightning Trainer with a PostHocEMA callback tracking sigma_rels (0.05, 0.10)
and writing no snapshots (their cost is the file write, reported as sizes below).

Timing: a first callback reads the clock in ``on_train_batch_start``, a last one in
``on_train_batch_end`` (after PostHocEMA's hook); PostHocEMA's ``on_train_batch_end`` is timed
from inside. ema% = time in that hook / time of the whole steps, over the timed steps (after
``warmup``), so with ``update_every_n_steps=8`` it is the amortized cost. Each round runs every
row once, order reversed on odd rounds; the table shows the median over rounds. On CUDA the
device is synchronized before each clock read.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch

from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import PostHocEMA
from lightning_diffusion.core.noise import VPProcess
from lightning_diffusion.core.weighting import MinSNRWeighting
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.ema import save_snapshot
from lightning_diffusion.networks import UNet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=48, help="timed optimizer steps per run (a multiple of 8)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats; the median is reported")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class TimedPostHocEMA(PostHocEMA):
    """PostHocEMA whose ``on_train_batch_end`` sums its own wall time after ``warmup`` steps."""

    def __init__(self, warmup: int, device: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.warmup, self.device, self.seconds = warmup, device, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(self.device)
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        _sync(self.device)
        if trainer.global_step > self.warmup:
            self.seconds += time.perf_counter() - start


class StepStart(pl.Callback):
    def __init__(self, device: str) -> None:
        self.device, self.start = device, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(self.device)
        self.start = time.perf_counter()


class StepEnd(pl.Callback):
    def __init__(self, first: StepStart, warmup: int) -> None:
        self.first, self.warmup, self.seconds = first, warmup, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(self.first.device)
        if trainer.global_step > self.warmup:
            self.seconds += time.perf_counter() - self.first.start


def make_module() -> DiffusionLightningModule:
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), num_classes=10)
    return DiffusionLightningModule(net, process=VPProcess(schedule="cosine"), prediction="v",
                                    weighting=MinSNRWeighting(gamma=5.0), num_classes=10, label_dropout=0.1,
                                    optimizer=functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.0))


def run(args: argparse.Namespace, every: int) -> tuple[float, float]:
    """(ms per step, EMA % of step time) for one training run."""
    ema = TimedPostHocEMA(args.warmup, args.device, sigma_rels=(0.05, 0.10), update_every_n_steps=every)
    start = StepStart(args.device)
    end = StepEnd(start, args.warmup)
    trainer = pl.Trainer(accelerator=args.device, devices=1, max_steps=args.warmup + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[start, ema, end], default_root_dir=tempfile.gettempdir())
    trainer.fit(make_module(), datamodule=DigitsDataModule(batch_size=args.batch_size))
    return 1000 * end.seconds / args.steps, 100 * ema.seconds / end.seconds


def snapshot_sizes(module: DiffusionLightningModule) -> dict[str, int]:
    """Bytes of one snapshot file (one profile) per dtype."""
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            path = save_snapshot(os.path.join(tmp, f"{dtype}.pt"), module.net.state_dict(), 0.1, 6.94, 1, dtype)
            sizes[dtype] = path.stat().st_size
    return sizes


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = {1: [], 8: []}
    for r in range(args.rounds):
        for every in (1, 8) if r % 2 == 0 else (8, 1):
            rows[every].append(run(args, every))
    module = make_module()
    params = sum(p.numel() for p in module.net.parameters())
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"steps={args.steps} (+{args.warmup} warm-up) rounds={args.rounds}; UNet {params / 1e6:.2f}M params, "
          "PostHocEMA sigma_rels=(0.05, 0.10)")
    print(f"{'update_every_n_steps':>20} {'step ms':>9} {'EMA % of step':>14}  (median over rounds)")
    for every, results in rows.items():
        print(f"{every:>20} {statistics.median(r[0] for r in results):>9.1f} "
              f"{statistics.median(r[1] for r in results):>13.2f}%")
    sizes = snapshot_sizes(module)
    print(f"snapshot file per profile: float32 {sizes['float32'] / 2**20:.2f} MiB, "
          f"float16 {sizes['float16'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
