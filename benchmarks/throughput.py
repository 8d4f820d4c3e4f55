"""Training throughput: DiffusionLightningModule under a Lightning Trainer vs a hand-written loop.

    python benchmarks/throughput.py                                    # defaults, ~1-2 min on 2 CPU cores
    python benchmarks/throughput.py --batch-size 256 --image-size 8    # the TESTING.md 8x8 case
    python benchmarks/throughput.py --device cuda --precision bf16-mixed --steps 300

All rows train the same UNet (same seed, so the same init), on the same data (the in-memory
DigitsDataModule and its seeded DataLoader), with AdamW, the same batch and the same diffusion math:
t ~ U{0..T-1}, eps ~ N(0, I), x_t = VPProcess.add_noise, eps-prediction through Parametrization,
per-sample MSE times the (constant) weighting, mean, backward, step. The hand loop calls those
pure-torch library pieces directly and runs no Lightning code (it only iterates the DataModule's
plain torch DataLoader).

Rows:
  hand               plain PyTorch loop.
  lightning (lean)   Trainer without logger, progress bar, checkpointing, model summary or
                     validation; log_every_n_steps > max_steps, so only the module's per-step
                     ``self.log("train/loss")`` runs (its bucket logging only at step 0, a warm-up step).
  lightning (logs)   as lean plus what a user gets by default: the default logger (CSV here, or
                     TensorBoard when installed) and log_every_n_steps=50, so the module's
                     per-noise-bucket logging runs every 50 steps.

Timing: steps/s = steps / (t_end - t_start), with t_start taken when step ``warmup`` starts (after its
batch is fetched) and t_end when step ``warmup + steps - 1`` has finished its optimizer step. For
Lightning a Callback reads the clock in on_train_batch_start / on_train_batch_end, so Trainer startup
and teardown are excluded. On CUDA the device is synchronized before each clock read. Each round runs
every row once, with the order reversed on odd rounds; the table shows the median over rounds (the
headline ratio) and the best round (robust to a neighbour's burst on a shared machine).
Threads: torch's default (no OMP_NUM_THREADS); the count is printed. On CPUs without AVX512-BF16
(e.g. the 2-core AMD EPYC dev machines) bf16 convolutions fall back to aten's slow conv2d and
bf16-mixed runs about 14x slower than fp32: compare precisions on CUDA only.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch

from hand_step import hand_loss
from lightning_diffusion.core.noise import VPProcess
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.weighting import ConstantWeighting
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.networks import UNet
from lightning_diffusion.timesteps import UniformTimesteps


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model-channels", type=int, default=32, help="UNet base width")
    p.add_argument("--image-size", type=int, default=8, help="digits are 8x8; 16 or 32 upsamples")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats; median and best are reported")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def make_net(args: argparse.Namespace) -> UNet:
    torch.manual_seed(args.seed)  # identical initial weights for every row and round
    return UNet(in_channels=1, image_size=args.image_size, model_channels=args.model_channels)


def make_data(args: argparse.Namespace) -> DigitsDataModule:
    return DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, seed=args.seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- hand-written loop
def run_hand(args: argparse.Namespace) -> tuple[float, float]:
    """Plain PyTorch: the same work as DiffusionLightningModule.training_step + Lightning's step."""
    device = torch.device(args.device)
    net = make_net(args).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr)
    process, weighting, timesteps = VPProcess(), ConstantWeighting(), UniformTimesteps(1000)
    param = Parametrization(process, "eps")
    gen = torch.Generator(device=device).manual_seed(args.seed)  # seeded once, not per step
    loader = make_data(args).train_dataloader()

    def batches():
        while True:  # epochs back to back, as the Trainer does
            yield from loader

    it, total = batches(), args.warmup + args.steps
    for i in range(total):
        x0, _labels = next(it)  # unconditional: labels unused, as in the module (num_classes=0)
        x0 = x0.to(device, non_blocking=True)
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        loss = hand_loss(net, param, weighting, timesteps, x0, gen, args.precision == "bf16-mixed")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    elapsed = time.perf_counter() - t0
    return args.steps / elapsed, float(loss.detach())


# ----------------------------------------------------------------------------- Lightning
def run_lightning(args: argparse.Namespace, logs: bool) -> tuple[float, float]:
    """DiffusionLightningModule under pl.Trainer; a Callback times steps warmup .. warmup+steps-1."""
    import lightning.pytorch as pl

    from lightning_diffusion.module import DiffusionLightningModule

    class StepTimer(pl.Callback):
        t0 = t1 = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.warmup:  # optimizer steps completed so far
                sync(pl_module.device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == args.warmup + args.steps:  # after this step's optimizer.step
                sync(pl_module.device)
                self.t1 = time.perf_counter()

    module = DiffusionLightningModule(
        make_net(args), process=VPProcess(), prediction="eps",
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr), seed=args.seed)
    timer = StepTimer()
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=args.device, devices=1, precision=args.precision, max_steps=total,
            callbacks=[timer], default_root_dir=root,
            logger=logs,  # True: the default logger a user gets (CSVLogger here, TensorBoard if installed)
            log_every_n_steps=50 if logs else total + 1,
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=make_data(args))
    assert timer.t0 is not None and timer.t1 is not None, "timing callback did not fire"
    return args.steps / (timer.t1 - timer.t0), float(trainer.callback_metrics.get("train/loss", float("nan")))


# ----------------------------------------------------------------------------- driver
def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")  # Lightning's advice (num_workers, log interval) is noise here
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    params = sum(p.numel() for p in make_net(args).parameters())
    threads = torch.get_num_threads()
    print(f"device={args.device} precision={args.precision} threads={threads} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} torch={torch.__version__}")
    print(f"UNet model_channels={args.model_channels} ({params / 1e6:.2f}M params), "
          f"input 1x{args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.rounds} rounds")
    if hasattr(os, "getloadavg"):
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    rows = {
        "hand": lambda: run_hand(args),
        "lightning (lean)": lambda: run_lightning(args, logs=False),
        "lightning (logs)": lambda: run_lightning(args, logs=True),
    }
    results: dict[str, list[float]] = {name: [] for name in rows}
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        order = list(rows) if r % 2 == 0 else list(reversed(rows))
        for name in order:
            rate, losses[name] = rows[name]()
            results[name].append(rate)
            print(f"  round {r + 1}: {name:<17} {rate:8.2f} steps/s")
    if torch.get_num_threads() != threads:
        print(f"note: torch threads changed {threads} -> {torch.get_num_threads()} during the run")

    # Median is the headline; best-of-rounds is robust to a neighbour's burst on a shared machine.
    hand, hand_best = statistics.median(results["hand"]), max(results["hand"])
    print(f"\n| {'loop':<17} | median steps/s | best steps/s | rounds (steps/s)      | ratio "
          "| ratio (best) | last loss |")
    print(f"|{'-' * 19}|{'-' * 16}|{'-' * 14}|{'-' * 23}|{'-' * 7}|{'-' * 14}|{'-' * 11}|")
    for name, rates in results.items():
        med, best = statistics.median(rates), max(rates)
        each = ", ".join(f"{x:.2f}" for x in rates)
        print(f"| {name:<17} | {med:14.2f} | {best:12.2f} | {each:<21} | {med / hand:5.3f} | "
              f"{best / hand_best:12.3f} | {losses[name]:9.4f} |")
    print("\nms/step: " + ", ".join(f"{n} {1000 / statistics.median(v):.2f}" for n, v in results.items()))
    if hasattr(os, "getloadavg"):
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
