"""The two training loops gpu_check.py compares, each timed, sync-counted and memory-measured alike.

Both run ``warmup`` untimed steps (compilation happens there), ``steps`` timed ones, then
``sync_steps`` more inside a sync window. The window is separate from the timing because the
dispatcher-level counter (``lightning_diffusion.diagnostics.HostSyncCounter``) slows every op. In
the window, every op that would stall the host on a GPU is counted on any device; on CUDA the
driver's own detector (``torch.cuda.set_sync_debug_mode``) counts the syncs it actually saw. The
dispatcher count runs on eager rows only (Dynamo does not trace under a dispatch mode), the CUDA
count on every row.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch

from gpu_check_specs import NetSpec, RandomImages
from hand_step import hand_loss
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.diagnostics import HostSyncCounter, host_side_tensors
from lightning_diffusion.timesteps.defaults import default_timesteps


@dataclass
class Timing:
    images_per_s: float
    step_ms: float
    peak_gib: float | None  # peak GPU memory allocated; None on CPU
    syncs_per_step: float | None  # dispatcher count (eager rows)
    cuda_syncs_per_step: float | None  # the CUDA driver's count (CUDA only)
    sync_ops: str = ""
    loss: float = float("nan")
    extra: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncWindow:
    """Count host syncs between ``open`` and ``close`` (dispatcher count and, on CUDA, the driver's)."""

    def __init__(self, device: torch.device, dispatcher: bool) -> None:
        self.device, self.dispatcher = device, dispatcher
        self.counter: HostSyncCounter | None = None
        self.cuda_count: int | None = None
        self._caught = None

    def open(self, optimizers=()) -> None:
        if self.dispatcher:  # optimizers' host-side step counters are read without a sync on a GPU too
            self.counter = HostSyncCounter(ignore=host_side_tensors(optimizers))
            self.counter.__enter__()
        if self.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def close(self) -> None:
        if self.device.type == "cuda" and self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.cuda_count = sum("synchroniz" in str(w.message) for w in self._records)
            self._caught.__exit__(None, None, None)
        if self.counter is not None:
            self.counter.__exit__(None, None, None)

    def result(self, steps: int) -> tuple[float | None, float | None, str]:
        per = None if self.counter is None else self.counter.count / steps
        cuda = None if self.cuda_count is None else self.cuda_count / steps
        return per, cuda, self.counter.summary() if self.counter is not None else ""


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()  # the previous row's trainer, net and optimizer state
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def compile_net(net: torch.nn.Module, backend: str | None) -> None:
    if backend:
        net.compile(backend=backend)


# ----------------------------------------------------------------------------- hand-written loop
def run_hand(spec: NetSpec, args: argparse.Namespace, backend: str | None) -> Timing:
    """Plain PyTorch: the module's training step written out, with the same data, net and optimizer."""
    device = torch.device(args.device)
    reset_peak(device)
    torch.manual_seed(0)
    net = spec.build().to(device).train()
    compile_net(net, backend)
    opt = spec.optimizer(net.parameters())
    process, prediction, weighting = spec.objective()
    param, timesteps = Parametrization(process, prediction), default_timesteps(process)
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = args.precision == "bf16-mixed"
    loader = RandomImages(spec.shape, spec.batch).train_dataloader()
    window = SyncWindow(device, dispatcher=backend is None)

    def batches():
        while True:
            yield from loader

    it = batches()
    first, last = args.warmup, args.warmup + args.steps
    for i in range(last + args.sync_steps):
        if i == first:
            sync(device)
            t0 = time.perf_counter()
        if i == last:
            sync(device)
            t1 = time.perf_counter()
            window.open([opt])
        x0, _ = next(it)
        loss = hand_loss(net, param, weighting, timesteps, x0.to(device, non_blocking=True), gen, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    window.close()
    syncs, cuda_syncs, ops = window.result(args.sync_steps)
    ms = (t1 - t0) / args.steps * 1000
    return Timing(spec.batch * 1000 / ms, ms, peak_gib(device), syncs, cuda_syncs, ops, float(loss.detach()))


# ----------------------------------------------------------------------------- the library
class _Clock(pl.Callback):
    """Timing and sync window of the library loop: one instance first in the callback list, one last.

    The first starts the clock when optimizer step ``first`` starts and opens the sync window when
    step ``last`` starts; the last (its ``on_train_batch_end`` runs after every other callback's)
    stops the clock once step ``last - 1`` has finished and closes the window after ``close_at``.
    """

    def __init__(self, first: int, last: int, close_at: int, window: SyncWindow, opens: bool) -> None:
        self.first, self.last, self.close_at, self.window, self.opens = first, last, close_at, window, opens
        self.t0 = self.t1 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.opens and trainer.global_step == self.first:
            sync(pl_module.device)
            self.t0 = time.perf_counter()
        if self.opens and trainer.global_step == self.last:
            self.window.open(trainer.optimizers)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.opens:
            return
        if trainer.global_step == self.last:  # steps completed, this one's optimizer step included
            sync(pl_module.device)
            self.t1 = time.perf_counter()
        if trainer.global_step == self.close_at:
            self.window.close()


def make_module(spec: NetSpec, backend: str | None, target=None) -> DiffusionLightningModule:
    torch.manual_seed(0)
    process, prediction, weighting = spec.objective()
    return DiffusionLightningModule(spec.build(), process=process, prediction=prediction, weighting=weighting,
                                    target=target, optimizer=spec.optimizer, compile=backend or False)


def run_library(spec: NetSpec, args: argparse.Namespace, backend: str | None, callbacks=(), target=None) -> Timing:
    """DiffusionLightningModule under a lean Trainer (the per-step work a CLI run does, minus the bar)."""
    device = torch.device(args.device)
    reset_peak(device)
    module = make_module(spec, backend, target)
    first, last = args.warmup, args.warmup + args.steps
    window = SyncWindow(device, dispatcher=backend is None)
    total = last + args.sync_steps
    start, end = (_Clock(first, last, total, window, opens=True), _Clock(first, last, total, window, opens=False))
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=device.type, devices=1, precision=args.precision, max_steps=total,
            callbacks=[start, *callbacks, end], default_root_dir=root, logger=False, log_every_n_steps=50,
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=RandomImages(spec.shape, spec.batch))
    assert start.t0 is not None and end.t1 is not None, "the timing callbacks did not fire"
    syncs, cuda_syncs, ops = window.result(args.sync_steps)
    ms = (end.t1 - start.t0) / args.steps * 1000
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    return Timing(spec.batch * 1000 / ms, ms, peak_gib(device), syncs, cuda_syncs, ops, loss)
