"""Per-rank memory of DDP vs FSDP2 for EDM2-S and EDM2-XXL, and CPU step time of both strategies.

    python benchmarks/fsdp_memory.py                      # ~1-2 min on 2 CPU cores
    python benchmarks/fsdp_memory.py --world-sizes 8 64 --steps 80
    python benchmarks/fsdp_memory.py --skip-measure       # part 1 only, a few seconds

1. memory (computed, no real memory): EDM2UNet with the paper's ImageNet-512 latent configs
   (64x64x4, 1000 classes, channel_mult (1, 2, 3, 4), 3 blocks, attention at 16 and 8;
   model_channels 192 = S, 448 = XXL), built on the meta device. Per-rank bytes of fp32
   parameters, gradients, AdamW state (exp_avg, exp_avg_sq) and PostHocEMA's two default
   profiles (sigma_rels 0.05, 0.10; the bytes PowerFunctionEMA itself allocates on each rank).
   DDP: every rank holds all of it. FSDP2: the network is
   sharded with ``lightning_diffusion.sharding.shard_module`` under a fake process group of world
   size N and rank 0's ``to_local()`` shards are counted (gradients, optimizer state and EMA
   averages are shaped like the local shards); torch.chunk arithmetic along dim 0 checks that
   rank 0 is the largest rank, and stands in if the fake process group fails. Activations, DDP's
   gradient buckets and FSDP2's transiently all-gathered unit are not counted.
2. step time (measured): ``lightning-diffusion fit`` of configs/edm2_tiny.yaml (0.7M parameters,
   8x8 digits, batch 128 per rank) on 2 CPU processes with configs/trainer/cpu_ddp.yaml and
   cpu_fsdp.yaml, in subprocesses. :class:`StepClock` (passed as a trainer callback) times the
   steps after ``--warmup`` on global rank 0, so start-up, sampling and teardown are excluded.
   Rounds alternate the order; the median is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
EDM2 = {"EDM2-S": (192, 280e6), "EDM2-XXL": (448, 1.5e9)}  # model_channels, the paper's parameter count
COPIES = {"params": 1, "grads": 1, "adamw": 2, "ema": 2}  # fp32 tensors shaped like the (local) parameters


class StepClock(pl.Callback):
    """Writes ms/step of the steps after ``warmup`` to ``path`` (JSON) from global rank 0 at the end of fit."""

    def __init__(self, path: str, warmup: int = 10) -> None:
        self.path, self.warmup = path, warmup
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        # Ranks wait for each other in every step's gradient collective: rank 0's clock is the step's.
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.end, self.steps = time.perf_counter(), trainer.global_step - self.warmup

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.steps:
            ms = 1000 * (self.end - self.start) / self.steps
            Path(self.path).write_text(json.dumps({"ms_per_step": ms, "steps": self.steps,
                                                   "strategy": type(trainer.strategy).__name__}))


def build_edm2(model_channels: int):
    import torch

    from lightning_diffusion.networks import EDM2UNet

    with torch.device("meta"):  # shapes only: XXL's 6 GB of fp32 state never exists
        return EDM2UNet(in_channels=4, image_size=64, model_channels=model_channels, channel_mult=(1, 2, 3, 4),
                        num_blocks=3, attention_resolutions=(16, 8), channels_per_head=64, num_classes=1000)


def chunk_rank_numel(shapes: list[tuple[int, ...]], world: int) -> list[int]:
    """Elements each rank holds when every parameter is split along dim 0 like torch.chunk (FSDP2's Shard(0))."""
    per_rank = [0] * world
    for shape in shapes:
        rows = shape[0] if shape else 1
        inner = 1
        for size in shape[1:]:
            inner *= size
        chunk = -(-rows // world)
        for rank in range(world):
            per_rank[rank] += max(0, min(chunk, rows - rank * chunk)) * inner
    return per_rank


def ema_bytes(net) -> int:
    """Bytes of the averages PostHocEMA's PowerFunctionEMA allocates for ``net`` (its defaults: 2 profiles)."""
    from lightning_diffusion.ema import PowerFunctionEMA

    ema = PowerFunctionEMA(net, (0.05, 0.10))  # on the meta device too: shapes are all that is allocated
    return sum(a.numel() * a.element_size() for averages in ema.averages for a in averages)


def fake_pg_rank0_numel(model_channels: int, world: int) -> tuple[int, int]:
    """Rank 0's local elements after ``shard_module`` under a fake process group of ``world`` ranks,
    and the bytes of the EMA averages the library's PowerFunctionEMA keeps on that rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lightning_diffusion.sharding import shard_module

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        net = build_edm2(model_channels)
        shard_module(net, init_device_mesh("cpu", (world,)), roots=(net,))
        return sum(p.to_local().numel() for p in net.parameters()), ema_bytes(net)
    finally:
        dist.destroy_process_group()


def largest_unit_numel(net) -> int:
    """Parameters of the biggest FSDP2 unit (a block, or the root's leftovers), all-gathered while it runs."""
    from lightning_diffusion.sharding import fsdp_blocks

    blocks = [sum(p.numel() for p in b.parameters()) for b in fsdp_blocks(net)]
    return max(blocks + [sum(p.numel() for p in net.parameters()) - sum(blocks)])


def breakdown(numel: int, ema: int | None = None) -> dict[str, int]:
    """fp32 bytes per copy shaped like ``numel`` parameters; ``ema``: the measured EMA bytes, if known."""
    parts = {name: 4 * numel * n for name, n in COPIES.items()}
    if ema is not None:
        parts["ema"] = ema
    return {**parts, "total": sum(parts.values())}


def memory(world_sizes: list[int]) -> dict:
    results = {}
    for name, (channels, paper) in EDM2.items():
        net = build_edm2(channels)
        shapes = [tuple(p.shape) for p in net.parameters()]
        params = sum(p.numel() for p in net.parameters())
        entry = {"model_channels": channels, "params": params, "paper_params": paper,
                 "largest_unit_params": largest_unit_numel(net), "ddp": breakdown(params, ema_bytes(net)), "fsdp2": {}}
        for world in world_sizes:
            per_rank = chunk_rank_numel(shapes, world)
            local, ema, route = max(per_rank), None, "chunk arithmetic"
            try:
                (local, ema), route = fake_pg_rank0_numel(channels, world), "fully_shard under fake PG (rank 0)"
            except Exception as error:  # noqa: BLE001 - any failure of the fake PG falls back to arithmetic
                route = f"chunk arithmetic (fake PG failed: {type(error).__name__}: {error})"
            entry["fsdp2"][str(world)] = {**breakdown(local, ema), "route": route, "ratio": params / local,
                                          "largest_rank": per_rank.index(max(per_rank)),
                                          "arithmetic_matches": local == max(per_rank)}
        results[name] = entry
    return results


def print_memory(results: dict) -> None:
    print("1. per-rank memory, fp32 (GiB); activations, DDP gradient buckets and FSDP2's gathered unit not counted")
    head = f"   {'strategy':14} {'params':>8} {'grads':>8} {'AdamW(2)':>9} {'EMA(2)':>8} {'total':>8} {'DDP/FSDP2':>10}"
    for name, entry in results.items():
        params, paper = entry["params"], entry["paper_params"]
        off = abs(params / paper - 1) > 0.15
        print(f"\n   {name} (model_channels {entry['model_channels']}): {params / 1e6:.1f}M parameters "
              f"(paper ~{paper / 1e6:.0f}M{': FAR OFF' if off else ''}); largest FSDP2 unit "
              f"{entry['largest_unit_params'] / 1e6:.1f}M params = {4 * entry['largest_unit_params'] / GIB:.3f} GiB "
              f"gathered")
        print(head)
        rows = [("DDP (any N)", entry["ddp"], None)]
        rows += [(f"FSDP2 N={w}", f, f["ratio"]) for w, f in entry["fsdp2"].items()]
        for label, b, ratio in rows:
            cells = " ".join(f"{b[k] / GIB:>{w}.3f}" for k, w in (("params", 8), ("grads", 8), ("adamw", 9),
                                                                    ("ema", 8), ("total", 8)))
            print(f"   {label:14} {cells} {(f'{ratio:.2f}x' if ratio else '-'):>10}")
        for w, f in entry["fsdp2"].items():
            check = "matches" if f["arithmetic_matches"] else "DIFFERS FROM"
            print(f"   N={w}: route {f['route']}; {check} torch.chunk arithmetic's largest rank "
                  f"(rank {f['largest_rank']})")


def fit_step_time(strategy: str, steps: int, warmup: int) -> dict:
    """ms/step of one 2-process CLI fit, or the error it ended with."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "clock.json"
        clock = {"class_path": "benchmarks.fsdp_memory.StepClock", "init_args": {"path": str(out), "warmup": warmup}}
        cmd = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", "configs/edm2_tiny.yaml",
               "--config", f"configs/trainer/cpu_{strategy}.yaml", f"--trainer.max_steps={warmup + steps}",
               "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               # the end-of-fit checkpoint lies outside the timed steps: it would only add wall time
               "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={folder}",
               "--model.init_args.fd_samples=0", f"--trainer.callbacks+={json.dumps(clock)}"]
        # Lightning picks a free port when MASTER_PORT is unset, and sets 1 thread per process
        # itself when OMP_NUM_THREADS is unset (2 processes on 2 cores).
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "OMP_NUM_THREADS")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode == 0 and out.exists():
            return {**json.loads(out.read_text()), "wall_s": wall}
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        return {"error": f"exit {proc.returncode}: " + ((errors or lines or ["no output"])[-1].strip()),
                "log_tail": lines[-30:], "wall_s": wall}


def measure(steps: int, warmup: int, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    for r in range(rounds):
        for strategy in ("ddp", "fsdp") if r % 2 == 0 else ("fsdp", "ddp"):
            if not any("error" in run for run in runs[strategy]):  # a failed strategy is not retried
                runs[strategy].append(fit_step_time(strategy, steps, warmup))
    results = {}
    for strategy, done in runs.items():
        good = [run["ms_per_step"] for run in done if "error" not in run]
        results[strategy] = {"runs": done, "ms_per_step": statistics.median(good) if good else None,
                             "error": next((run["error"] for run in done if "error" in run), None)}
    return results


def print_measure(results: dict, steps: int, warmup: int, rounds: int) -> None:
    print(f"\n2. CPU step time, configs/edm2_tiny.yaml, 2 processes x batch 128, {steps} steps after {warmup}, "
          f"median of {rounds} round(s)")
    print(f"   {'strategy':10} {'ms/step':>8} {'FSDP2/DDP':>10}  rounds (ms/step)")
    ddp = results["ddp"]["ms_per_step"]
    for strategy, label in (("ddp", "DDP"), ("fsdp", "FSDP2")):
        r = results[strategy]
        if r["ms_per_step"] is None:
            print(f"   {label:10} {'failed':>8} {'-':>10}  {r['error']}")
            continue
        ratio = f"{r['ms_per_step'] / ddp:.2f}x" if ddp else "-"
        each = ", ".join(f"{run['ms_per_step']:.1f}" for run in r["runs"] if "error" not in run)
        print(f"   {label:10} {r['ms_per_step']:8.1f} {ratio:>10}  {each}")
        if r["error"]:
            print(f"   {'':10} a round failed: {r['error']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8], help="FSDP2 world sizes of part 1")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per fit")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=1, help="fits per strategy, order alternating; median shown")
    p.add_argument("--skip-measure", action="store_true", help="part 1 only")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/fsdp_memory.json"))
    args = p.parse_args()
    import torch

    start = time.perf_counter()
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {os.cpu_count()} cores")
    results: dict = {"torch": torch.__version__, "lightning": pl.__version__, "memory": memory(args.world_sizes)}
    print_memory(results["memory"])
    if not args.skip_measure:
        results["step_time"] = measure(args.steps, args.warmup, args.rounds)
        results["step_time"]["settings"] = {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds}
        print_measure(results["step_time"], args.steps, args.warmup, args.rounds)
    results["wall_s"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
