"""Overhead of the timestep samplers: uniform vs loss-aware vs adaptive, as a fraction of step time.

    python benchmarks/timestep_samplers.py                       # quickstart model, ~1-2 min on 2 CPU cores
    python benchmarks/timestep_samplers.py --rounds 1 --steps 40 # a quick look
    python benchmarks/timestep_samplers.py --device cuda --batch-size 256 --steps 400

Every row trains the quickstart recipe's network and objective (UNet 32 channels, [1, 2], attention
at 4x4; VP cosine, v-prediction, Min-SNR-5; AdamW) on the embedded digits, under the same lean
Trainer (no logger, progress bar, checkpointing or validation), from the same initial weights:

  uniform      the module's default ``UniformTimesteps``.
  loss-aware   ``LossAwareTimestepSampling(history=10, uniform_prob=1e-3)``: a weighted draw and a
               ring-buffer update every step (goal: <= 2% over uniform).
  adaptive     ``AdaptiveTimestepSampling(update_every=40)``: a policy forward every step, and every
               40 steps the look-ahead (|S| x batch + 20 probe evaluations, before and after the
               step) and a REINFORCE step (goal: <= 15% over uniform).
  adaptive-vlb as adaptive with ``reward="vlb"``: the look-ahead scores each timestep's term of the
               variational bound instead of the training loss.

Timing: a Callback placed after the sampler callbacks reads the clock when step ``warmup`` starts
and when step ``warmup + steps - 1`` has finished (its ``on_train_batch_end`` runs after theirs), so
Trainer start-up is excluded and the adaptive sampler's after-step work is included. ``--steps``
should be a multiple of ``--update-every`` so the timed window holds whole update periods. Rows
run interleaved, reversed on odd rounds; the table shows the median and the best round.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch

from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import AdaptiveTimestepSampling, LossAwareTimestepSampling
from lightning_diffusion.core.noise import VPProcess
from lightning_diffusion.core.weighting import MinSNRWeighting
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.networks import UNet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--update-every", type=int, default=40, help="the adaptive sampler's update period")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Clock at the start of step ``first`` and the end of step ``last`` (optimizer steps)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.t0, self.t1 = first, last, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first:
            sync(pl_module.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.last:
            sync(pl_module.device)
            self.t1 = time.perf_counter()


def make_sampler(name: str, args: argparse.Namespace) -> list[pl.Callback]:
    if name == "loss-aware":
        return [LossAwareTimestepSampling(history=10, uniform_prob=1e-3, log_distribution_every=0)]
    if name.startswith("adaptive"):
        return [AdaptiveTimestepSampling(update_every=args.update_every, log_distribution_every=0, show_subset=False,
                                         reward="vlb" if name == "adaptive-vlb" else "loss")]
    return []


def run(name: str, args: argparse.Namespace) -> float:
    """Seconds per optimizer step of one row."""
    torch.manual_seed(args.seed)
    net = UNet(in_channels=1, image_size=8, model_channels=args.model_channels, channel_mult=(1, 2),
               num_res_blocks=1, attention_resolutions=(4,))
    module = DiffusionLightningModule(net, process=VPProcess("cosine"), prediction="v",
                                      weighting=MinSNRWeighting(5.0), seed=args.seed,
                                      optimizer=functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.0))
    timer = StepTimer(args.warmup, args.warmup + args.steps)
    trainer = pl.Trainer(accelerator=args.device, devices=1, max_steps=args.warmup + args.steps, logger=False,
                         callbacks=[*make_sampler(name, args), timer], enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=args.batch_size, seed=args.seed))
    assert timer.t0 is not None and timer.t1 is not None, "timing callback did not fire"
    return (timer.t1 - timer.t0) / args.steps


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"batch={args.batch_size} model_channels={args.model_channels} update_every={args.update_every} "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.rounds} rounds")
    if hasattr(os, "getloadavg"):
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    names = ["uniform", "loss-aware", "adaptive", "adaptive-vlb"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(run(name, args))
            print(f"  round {r + 1}: {name:<12} {1000 * times[name][-1]:8.2f} ms/step")
    base, base_best = statistics.median(times["uniform"]), min(times["uniform"])
    print(f"\n| sampler      | median ms/step | best ms/step | overhead (median) | overhead (best) |")
    print(f"|--------------|----------------|--------------|-------------------|-----------------|")
    for name in names:
        med, best = statistics.median(times[name]), min(times[name])
        print(f"| {name:<12} | {1000 * med:14.2f} | {1000 * best:12.2f} | {100 * (med / base - 1):+16.1f}% "
              f"| {100 * (best / base_best - 1):+14.1f}% |")
    if hasattr(os, "getloadavg"):
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
