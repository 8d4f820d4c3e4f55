"""GPU readiness, measured in one run: throughput against a hand loop, callback costs, memory, MFU, host syncs.

    python benchmarks/gpu_check.py                  # one CUDA GPU, bf16-mixed: a few minutes
    python benchmarks/gpu_check.py --nets UNet DiT-B/2 --no-compile
    python benchmarks/gpu_check.py --dry-run        # CPU, tiny nets, a few steps (the test suite runs this)

For each network (UNet, EDM2UNet-XS, EDM2UNet-S, DiT-B/2; sizes in gpu_check_specs.py), eager and
compiled: images/s of the library's training step (DiffusionLightningModule under a Trainer)
against the same step written by hand in PyTorch (same net, data, optimizer, precision), peak GPU
memory, model FLOP utilization (FLOPs of forward + backward counted by torch's FlopCounterMode,
against the card's dense bf16 peak), host syncs per step (every op that would stall the host,
counted at the dispatcher, and on CUDA the driver's own count) and Dynamo graph breaks. Then the
cost of each callback (post-hoc EMA, loss-aware, adaptive, curriculum) and of the STF target as a
percentage of the plain library step on the UNet. Last, a full-stack fit through the command line
(``configs/full_stack.yaml``, 200 steps) whose final validation loss must be below the untrained
network's.

Prints one table (and the fit's verdict) and writes everything to ``--json``. The exit code is 1 if
any row failed or the fit did not lower the loss.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from gpu_check_loops import Timing, run_hand, run_library  # noqa: E402
from gpu_check_specs import count_flops, peak_tflops, specs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny nets, a few steps: checks the script itself")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    p.add_argument("--nets", nargs="+", default=None, help="default: every net (UNet EDM2UNet-XS EDM2UNet-S DiT-B/2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 50; dry run 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (15; 2)")
    p.add_argument("--sync-steps", type=int, default=None, help="steps in the host-sync window (5; 2)")
    p.add_argument("--backend", default=None, help="torch.compile backend (inductor; dry run aot_eager)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--callback-steps", type=int, default=None, help="timed steps of the callback rows (80; 4)")
    p.add_argument("--fit-steps", type=int, default=None, help="steps of the CLI full-stack fit (200; 24; 0: skip)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not in the table")
    p.add_argument("--json", default=None, help="default: benchmarks/results/gpu_check.json (dry run: outputs/)")
    args = p.parse_args(argv)
    dry = args.dry_run
    if args.device == "auto":
        args.device = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --dry-run for the CPU check.")
    defaults = dict(precision="bf16-mixed" if args.device == "cuda" else "32-true",
                    steps=3 if dry else 50, warmup=2 if dry else 15, sync_steps=2 if dry else 5,
                    backend="aot_eager" if dry else "inductor", callback_steps=4 if dry else 80,
                    fit_steps=24 if dry else 200,
                    json=str(ROOT / ("outputs/gpu_check_dry_run.json" if dry else "benchmarks/results/gpu_check.json")))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [s.name for s in specs(dry)]
    unknown = [n for n in args.nets or [] if n not in names]
    if unknown:
        p.error(f"--nets: {unknown} unknown; choose from {names}.")
    for name in ("steps", "warmup", "sync_steps", "callback_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: give a positive number of steps.")
    return args


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def attempt(row: dict, fn) -> Timing | None:
    """Run one measurement; a failure (an OOM, a compile error) is recorded in its row, not fatal."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - one row's failure must not cost the whole GPU run
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        traceback.print_exc()
        return None
    finally:
        print("  " + " | ".join(f"{k}={v}" for k, v in row.items() if k not in ("sync_ops",)), flush=True)


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def network_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    for spec in specs(args.dry_run):
        if args.nets and spec.name not in args.nets:
            continue
        flops = count_flops(spec, device)
        for backend in [None] + ([] if args.no_compile else [args.backend]):
            row = {"section": "network", "net": spec.name, "compile": backend or "eager",
                   "batch": spec.batch, "input": "x".join(map(str, spec.shape)), "gflops_per_step": flops / 1e9}
            before = graph_breaks()  # around both loops: the second may reuse the first's compiled graphs
            hand = attempt(dict(row, loop="hand"), lambda: run_hand(spec, args, backend))
            lib = attempt(dict(row, loop="library"), lambda: run_library(spec, args, backend))
            if hand is None or lib is None:
                row["error"] = "see the log above"
                rows.append(row)
                continue
            row.update(hand_images_per_s=hand.images_per_s, images_per_s=lib.images_per_s,
                       ratio_to_hand=lib.images_per_s / hand.images_per_s, step_ms=lib.step_ms,
                       peak_gib=lib.peak_gib, hand_peak_gib=hand.peak_gib,
                       mfu=None if peak is None else flops * lib.images_per_s / spec.batch / (peak * 1e12),
                       syncs_per_step=lib.syncs_per_step, hand_syncs_per_step=hand.syncs_per_step,
                       cuda_syncs_per_step=lib.cuda_syncs_per_step, sync_ops=lib.sync_ops,
                       graph_breaks=graph_breaks() - before if backend else None)
            rows.append(row)


def callback_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    from lightning_diffusion.callbacks import (AdaptiveTimestepSampling, LossAwareTimestepSampling, PostHocEMA,
                                               TimestepCurriculum)
    from lightning_diffusion.core.targets import StableTargetField

    spec = specs(args.dry_run)[0]  # the UNet: a VP process, which every callback supports
    local = argparse.Namespace(**vars(args))
    local.steps = args.callback_steps
    every = max(1, args.callback_steps // 2)  # whole adaptive update periods inside the timed window
    tmp = tempfile.mkdtemp(prefix="gpu_check_ema_")
    variants = {
        "none": ([], None),
        "PostHocEMA": ([PostHocEMA(sigma_rels=(0.05, 0.10), dirpath=tmp)], None),
        "LossAwareTimestepSampling": ([LossAwareTimestepSampling(history=10, log_distribution_every=0)], None),
        "AdaptiveTimestepSampling": ([AdaptiveTimestepSampling(update_every=every, log_distribution_every=0,
                                                               show_subset=False)], None),
        "TimestepCurriculum": ([TimestepCurriculum(num_clusters=10, pacing="fixed", steps_per_stage=every,
                                                   verbose=False)], None),
        "StableTargetField": ([], StableTargetField(reference_size=32 if args.dry_run else 1024, source="fresh")),
    }
    base = None
    for name, (callbacks, target) in variants.items():
        row = {"section": "callback", "net": spec.name, "compile": "eager", "callback": name, "batch": spec.batch}
        timing = attempt(row, lambda: run_library(spec, local, None, callbacks, target))
        if timing is not None:
            base = timing if name == "none" else base
            row.update(images_per_s=timing.images_per_s, step_ms=timing.step_ms, peak_gib=timing.peak_gib,
                       overhead_pct=None if base is None else 100 * (timing.step_ms / base.step_ms - 1),
                       syncs_per_step=timing.syncs_per_step, cuda_syncs_per_step=timing.cuda_syncs_per_step,
                       sync_ops=timing.sync_ops)
        rows.append(row)


def _val_losses(root: Path) -> list[float]:
    files = sorted(root.rglob("metrics.csv"))
    if not files:
        return []
    with open(files[-1]) as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]


def fit_row(args: argparse.Namespace) -> dict:
    """``lightning-diffusion fit --config configs/full_stack.yaml`` for ``fit_steps``: its final val/loss must
    be below the untrained network's (``validate`` on the same recipe without a checkpoint first).

    Not the first validation of the fit: the curriculum trains the noisiest levels first, so the
    all-level validation loss may rise between two early validations while the model learns.
    """
    every = max(1, args.fit_steps // 4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = ["--config", str(ROOT / "configs/full_stack.yaml"),
                  f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                  f"--trainer.precision={args.precision}", "--trainer.enable_progress_bar=false"]
        if args.dry_run:  # a narrower net, a smaller batch, no FD: seconds on a CPU
            common += ["--model.init_args.net.init_args.model_channels=16", "--data.init_args.batch_size=32",
                       "--model.init_args.fd_samples=0"]
        cli = [sys.executable, "-m", "lightning_diffusion"]
        # The untrained net, raw weights (no callbacks: there is no EMA to validate yet).
        init = subprocess.run(cli + ["validate", *common, "--trainer.callbacks=[]",
                                     f"--trainer.default_root_dir={root / 'init'}"],
                              cwd=ROOT, capture_output=True, text=True)
        cmd = cli + ["fit", *common, f"--trainer.max_steps={args.fit_steps}", f"--trainer.val_check_interval={every}",
                     f"--trainer.log_every_n_steps={max(1, every // 2)}", f"--trainer.default_root_dir={root / 'fit'}"]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        row = {"section": "fit", "command": " ".join(cmd[1:]).replace(tmp, "TMP"), "exit_code": proc.returncode,
               "seconds": time.perf_counter() - started}
        untrained, val = _val_losses(root / "init"), _val_losses(root / "fit")
        row.update(untrained_val_loss=untrained[0] if untrained else None, val_losses=val,
                   lowered=bool(untrained and val and val[-1] < untrained[0]))
        for name, result in (("validate", init), ("fit", proc)):
            if result.returncode:
                row["error"] = f"{name}: " + (result.stderr.strip().splitlines() or ["no output"])[-1]
    return row


def environment(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
            "torch": torch.__version__, "cuda": torch.version.cuda, "precision": args.precision,
            "peak_bf16_tflops": peak_tflops(device, args.peak_tflops), "dry_run": args.dry_run,
            "steps": args.steps, "warmup": args.warmup, "sync_steps": args.sync_steps, "backend": args.backend}


def table(rows: list[dict]) -> str:
    head = ("| row | compile | images/s hand | images/s library | library/hand | callback overhead | peak GiB "
            "| MFU | host syncs/step (dispatcher) | CUDA syncs/step | graph breaks |\n" + "|---" * 11 + "|")
    lines = [head]
    for r in rows:
        if r["section"] == "fit":
            continue
        name = r["net"] if r["section"] == "network" else f"{r['net']} + {r['callback']}"
        if "error" in r:
            lines.append(f"| {name} | {r['compile']} | failed: {r['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {name} | {r['compile']} | {fmt(r.get('hand_images_per_s'), '.1f')} | {fmt(r.get('images_per_s'), '.1f')} "
            f"| {fmt(r.get('ratio_to_hand'), '.3f')} | {fmt(r.get('overhead_pct'), '+.1f')}{'%' if r.get('overhead_pct') is not None else ''} "
            f"| {fmt(r.get('peak_gib'), '.2f')} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('syncs_per_step'), '.2f')} "
            f"| {fmt(r.get('cuda_syncs_per_step'), '.2f')} | {fmt(r.get('graph_breaks'), 'd')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    env = environment(args)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows: list[dict] = []
    network_rows(args, rows)
    callback_rows(args, rows)
    fit = fit_row(args) if args.fit_steps > 0 else None
    print("\n" + table(rows))
    if fit is not None:
        untrained = fit["untrained_val_loss"]
        print(f"\nfull-stack CLI fit, {args.fit_steps} steps ({fit['seconds']:.0f} s, exit {fit['exit_code']}): "
              f"val/loss untrained {fmt(untrained, '.4f')}, then {' -> '.join(f'{v:.4f}' for v in fit['val_losses'])}: "
              f"{'lowered' if fit['lowered'] else 'NOT lowered'}")
        rows.append(fit)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    os.replace(tmp, out)  # a crash mid-write leaves the previous results, never half a file
    print(f"wrote {out}")
    failed = [r for r in rows if "error" in r] + ([fit] if fit is not None and not fit["lowered"] else [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
