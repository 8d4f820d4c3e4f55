"""Convergence study: every technique and the full stack against the baseline, side by side.

    python benchmarks/convergence.py --quick          # < 10 min on 2 CPU cores: 1 seed, 300 steps, small UNet
    python benchmarks/convergence.py                  # full: 3 seeds x 1000 steps, quickstart UNet (see README)
    python benchmarks/convergence.py --arms baseline min_snr --seeds 0 1 2 --steps 1000
    python benchmarks/convergence.py --gpu            # larger UNet and batch on a CUDA device

Every arm trains the same network on the embedded 8x8 digits through the real command line
(``configs/quickstart.yaml`` + ``benchmarks/arms/base.yaml`` + the arm's YAML), evaluates the
validation loss on the fixed noise grid and the FD at regular intervals, and logs the training
wall-clock (``WallClock``, validation excluded). Results go to ``--out``: ``curves.csv`` (every
evaluation of every run), ``convergence.png`` (FD and validation loss vs steps, mean and range
over seeds) and ``results.md`` (steps and wall-clock to reach the baseline's final FD, as a
speed-up over the baseline, with the spread over seeds); see ``convergence_report.py``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from convergence_report import write_report  # noqa: E402


@dataclass(frozen=True)
class Arm:
    configs: tuple[str, ...]  # YAML files under benchmarks/arms/, applied in order after base.yaml
    baseline: str  # the arm this one is compared with
    summary: str


ARMS: dict[str, Arm] = {
    "baseline": Arm(("baseline.yaml",), "baseline", "VP cosine, eps, constant weight, uniform t"),
    "min_snr": Arm(("min_snr.yaml",), "baseline", "Min-SNR-5 weighting"),
    "loss_aware": Arm(("loss_aware.yaml",), "baseline", "loss-aware importance sampling of t"),
    "adaptive": Arm(("adaptive.yaml",), "baseline", "learned adaptive timestep sampler"),
    "curriculum": Arm(("curriculum.yaml",), "baseline", "easy-to-hard timestep curriculum"),
    "stf": Arm(("stf.yaml",), "baseline", "Stable Target Field, 1024 references"),
    "posthoc_ema": Arm(("posthoc_ema.yaml",), "baseline", "post-hoc EMA (validated at sigma_rel 0.10)"),
    "edm_baseline": Arm(("edm_baseline.yaml",), "edm_baseline", "EDM: log-normal sigma, EDM weighting"),
    "edm2_uncertainty": Arm(("edm_baseline.yaml", "edm2_uncertainty.yaml"), "edm_baseline",
                            "EDM + EDM2 learned uncertainty weighting"),
    "full_stack": Arm(("min_snr.yaml", "stf.yaml", "full_stack.yaml"), "baseline",
                      "Min-SNR + STF + loss-aware + curriculum + post-hoc EMA"),
    "flow": Arm(("flow.yaml",), "baseline", "rectified flow, logit-normal t, velocity loss"),
}

FIELDS = ["arm", "seed", "step", "images", "train_seconds", "val_loss", "val_mse_x0", "val_fd"]


def available_arms() -> list[str]:
    return [name for name, arm in ARMS.items() if all((HERE / "arms" / c).is_file() for c in arm.configs)]


def cli_args(arm: Arm, seed: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    configs = [str(ROOT / "configs" / "quickstart.yaml"), str(HERE / "arms" / "base.yaml")]
    configs += [str(HERE / "arms" / c) for c in arm.configs]
    out = ["fit"]
    for c in configs:
        out += ["--config", c]
    out += [
        "--trainer.callbacks+=lightning_diffusion.callbacks.WallClock",
        # One sample grid per run at most (the CLI would add one per validation).
        "--trainer.callbacks+=lightning_diffusion.callbacks.SampleGrid",
        f"--trainer.callbacks.every_n_validations={10**6}",
        f"--seed_everything={seed}", f"--model.init_args.seed={seed}",
        f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={args.eval_every}",
        f"--trainer.default_root_dir={run_dir}", f"--model.init_args.fd_samples={args.fd_samples}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--model.init_args.net.init_args.model_channels={args.model_channels}",
        f"--trainer.accelerator={args.accelerator}", "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={run_dir}", "--trainer.enable_checkpointing=true",
    ]
    return out + list(args.extra)


def read_curve(log_dir: Path, arm: str, seed: int, batch_size: int) -> list[dict]:
    rows = []
    with open(log_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            if r.get("val/fd"):
                step = int(float(r["time/global_step"]))
                rows.append({"arm": arm, "seed": seed, "step": step, "images": int(float(r["time/images_seen"])),
                             "train_seconds": float(r.get("time/train_seconds") or "nan"),
                             "val_loss": float(r["val/loss"]), "val_mse_x0": float(r.get("val/mse_x0") or "nan"),
                             "val_fd": float(r["val/fd"])})
    return rows


def run(arm_name: str, seed: int, args: argparse.Namespace) -> list[dict]:
    from lightning_diffusion.callbacks import PostHocEMA
    from lightning_diffusion.cli import DiffusionCLI

    run_dir = Path(args.out) / "runs" / f"{arm_name}-seed{seed}"
    start = time.perf_counter()
    cli = DiffusionCLI(args=cli_args(ARMS[arm_name], seed, args, run_dir))
    rows = read_curve(Path(cli.trainer.log_dir), arm_name, seed, args.batch_size)
    if args.sweep and any(isinstance(c, PostHocEMA) for c in cli.trainer.callbacks):
        rows.append(best_reconstruction(cli, arm_name, seed, args, rows[-1]))
    print(f"{arm_name} seed {seed}: final FD {rows[-1]['val_fd']:.2f}, val loss {rows[-1]['val_loss']:.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def best_reconstruction(cli, arm_name: str, seed: int, args: argparse.Namespace, last: dict) -> dict:
    """Rebuild several sigma_rel at the end (docs/algorithms.md 3.5) and keep the best FD as the final point."""
    from lightning_diffusion.phema_tool import sweep

    log_dir = Path(cli.trainer.log_dir)
    rows = sweep(log_dir, args.sweep, config=[str(log_dir / "config.yaml")],
                 cli_args=["--trainer.logger=false", "--trainer.callbacks=[]"])
    best = min(rows, key=lambda r: r["val/fd"])
    print(f"  post-hoc sweep: " + ", ".join(f"{r['sigma_rel']:.3f} -> {r['val/fd']:.2f}" for r in rows), flush=True)
    return {**last, "val_fd": best["val/fd"], "arm": f"{arm_name}"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 300 steps, 16-channel UNet, 128 FD samples")
    p.add_argument("--gpu", action="store_true", help="CUDA: 64-channel UNet, batch 256")
    p.add_argument("--arms", nargs="+", default=None, help=f"default: every available arm of {list(ARMS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--fd-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--model-channels", type=int, default=None)
    p.add_argument("--sweep", type=float, nargs="*", default=None,
                   help="sigma_rels rebuilt at the end of the post-hoc EMA arm (default: 0.05 0.08 0.12 0.16; none in --quick)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "convergence"))
    p.add_argument("extra", nargs="*", help="more CLI overrides for every run, after --")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(seeds=[0] if quick else [0, 1, 2], steps=300 if quick else 1000,
                    fd_samples=128 if quick else 256, batch_size=64,
                    model_channels=64 if args.gpu else (16 if quick else 32),
                    sweep=[] if quick else [0.05, 0.08, 0.12, 0.16])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu:
        args.batch_size = max(args.batch_size, 256)
    args.eval_every = args.eval_every or max(1, args.steps // (6 if quick else 10))
    args.accelerator = "gpu" if args.gpu else "cpu"
    available = available_arms()
    args.arms = args.arms or available
    unknown = [a for a in args.arms if a not in available]
    if unknown:
        p.error(f"--arms: {unknown} not available; choose from {available}")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    needed = sorted({ARMS[a].baseline for a in args.arms} | set(args.arms), key=list(ARMS).index)
    rows: list[dict] = []
    started = time.perf_counter()
    for arm in needed:
        for seed in args.seeds:
            rows += run(arm, seed, args)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    minutes = (time.perf_counter() - started) / 60
    setup = (f"{len(args.seeds)} seed(s), {args.steps} steps, batch {args.batch_size}, UNet {args.model_channels} "
             f"channels, FD on {args.fd_samples} samples every {args.eval_every} steps; {minutes:.1f} min total")
    write_report(out, {a: ARMS[a] for a in needed}, setup)
    print(f"\n{(out / 'results.md').read_text()}\nwrote {out / 'curves.csv'}, {out / 'convergence.png'}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
