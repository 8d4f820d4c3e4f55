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
from mixture_report import write_report as write_mixture_report  # noqa: E402


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
# The mixture study's columns: the exact scores of GaussianMixtureMetrics (NaN where not computed).
MIXTURE_LEVELS = 8
MIXTURE_SEEDS, MIXTURE_STEPS = 5, 600
MIXTURE_FIELDS = (FIELDS[:-1] + ["val_excess_pct", "val_excess", "val_fd_exact", "val_class_accuracy", "val_nll_gap"]
                  + [f"val_excess_pct_level{i}" for i in range(MIXTURE_LEVELS)])
CURVES = {"digits": (FIELDS, "val/fd"), "mixture": (MIXTURE_FIELDS, "val/excess_pct")}  # columns, the score


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
        f"--trainer.default_root_dir={run_dir}",
        f"--model.init_args.fd_samples={0 if args.data == 'mixture' else args.fd_samples}",
        *mixture_args(args),
        f"--data.init_args.batch_size={args.batch_size}",
        f"--model.init_args.net.init_args.model_channels={args.model_channels}",
        f"--trainer.accelerator={args.accelerator}", "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={run_dir}", "--trainer.enable_checkpointing=true",
    ]
    return out + list(args.extra)


def mixture_args(args: argparse.Namespace) -> list[str]:
    """The Gaussian-mixture data and its exact scores (docs/algorithms.md 7); nothing for the digits study."""
    if args.data != "mixture":
        return []
    return ["--data=lightning_diffusion.data.GaussianMixtureDataModule",
            "--trainer.callbacks+=lightning_diffusion.callbacks.GaussianMixtureMetrics",
            f"--trainer.callbacks.num_levels={MIXTURE_LEVELS}", f"--trainer.callbacks.eval_size={args.eval_size}",
            f"--trainer.callbacks.num_samples={args.fd_samples}",
            f"--trainer.callbacks.sample_every_n_validations={args.sample_every}"]


def read_curve(log_dir: Path, arm: str, seed: int, data: str) -> list[dict]:
    """The run's evaluations from its metrics.csv: the rows holding the study's score, as ``FIELDS`` of ``data``."""
    fields, score = CURVES[data]
    rows = []
    with open(log_dir / "metrics.csv") as f:
        for r in csv.DictReader(f):
            if r.get(score):
                row = {"arm": arm, "seed": seed, "step": int(float(r["time/global_step"])),
                       "images": int(float(r["time/images_seen"]))}
                for field in fields[len(row):]:  # train_seconds from time/, the val_ scores from val/
                    key = "time/train_seconds" if field == "train_seconds" else field.replace("val_", "val/", 1)
                    row[field] = float(r.get(key) or "nan")
                rows.append(row)
    return rows


def run(arm_name: str, seed: int, args: argparse.Namespace) -> list[dict]:
    from lightning_diffusion.callbacks import PostHocEMA
    from lightning_diffusion.cli import DiffusionCLI

    run_dir = Path(args.out) / "runs" / f"{arm_name}-seed{seed}"
    start = time.perf_counter()
    cli = DiffusionCLI(args=cli_args(ARMS[arm_name], seed, args, run_dir))
    rows = read_curve(Path(cli.trainer.log_dir), arm_name, seed, args.data)
    if args.sweep and any(isinstance(c, PostHocEMA) for c in cli.trainer.callbacks):
        rows.append(best_reconstruction(cli, arm_name, seed, args, rows[-1]))
    score = (f"excess {rows[-1]['val_excess_pct']:.1f}% above Bayes" if args.data == "mixture"
             else f"final FD {rows[-1]['val_fd']:.2f}")
    print(f"{arm_name} seed {seed}: {score}, val loss {rows[-1]['val_loss']:.4f} "
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
    p.add_argument("--data", choices=["mixture", "digits"], default="mixture",
                   help="mixture: the exact Gaussian-mixture benchmark (default); digits: the FD study on the digits")
    p.add_argument("--quick", action="store_true", help="a few minutes: 1 seed, fewer steps, 16-channel UNet")
    p.add_argument("--gpu", action="store_true", help="CUDA: 64-channel UNet, batch 256")
    p.add_argument("--arms", nargs="+", default=None, help=f"default: every available arm of {list(ARMS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--fd-samples", type=int, default=None,
                   help="generated samples per FD (digits) or per sample score (mixture: exact FD, class accuracy)")
    p.add_argument("--eval-size", type=int, default=None, help="mixture: fixed images per noise level")
    p.add_argument("--sample-every", type=int, default=None,
                   help="mixture: sample scores every this many validations (the last one always included)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--model-channels", type=int, default=None)
    p.add_argument("--sweep", type=float, nargs="*", default=None,
                   help="sigma_rels rebuilt at the end of the post-hoc EMA arm (default: 0.05 0.08 0.12 0.16; none in --quick)")
    p.add_argument("--out", default=None, help="default: outputs/convergence/<data>")
    p.add_argument("extra", nargs="*", help="more CLI overrides for every run, after --")
    args = p.parse_args(argv)
    quick, mixture = args.quick, args.data == "mixture"
    if mixture:  # sized from measured spreads (docs/algorithms.md 7.3)
        defaults = dict(seeds=[0] if quick else list(range(MIXTURE_SEEDS)), steps=150 if quick else MIXTURE_STEPS,
                        fd_samples=500 if quick else 1000, eval_size=256 if quick else 1024, batch_size=64,
                        model_channels=64 if args.gpu else (16 if quick else 32), sweep=[])
    else:
        defaults = dict(seeds=[0] if quick else [0, 1, 2], steps=300 if quick else 1000,
                        fd_samples=128 if quick else 1000, batch_size=64, eval_size=0,
                        model_channels=64 if args.gpu else (16 if quick else 32),
                        sweep=[] if quick else [0.05, 0.08, 0.12, 0.16])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu:
        args.batch_size = max(args.batch_size, 256)
    args.eval_every = args.eval_every or max(1, args.steps // (6 if quick else 10))
    evaluations = max(1, args.steps // args.eval_every)
    args.sample_every = args.sample_every or evaluations  # the last validation gets sample scores
    if evaluations % args.sample_every:
        p.error(f"--sample-every: {args.sample_every} does not divide the {evaluations} validations, so the last "
                "would have no sample scores; give a divisor.")
    args.accelerator = "gpu" if args.gpu else "cpu"
    args.out = args.out or str(ROOT / "outputs" / "convergence" / args.data)
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
        writer = csv.DictWriter(f, fieldnames=CURVES[args.data][0])
        writer.writeheader()
        writer.writerows(rows)
    minutes = (time.perf_counter() - started) / 60
    arms = {a: ARMS[a] for a in needed}
    if args.data == "mixture":
        from lightning_diffusion.metrics.mixture import sigma_grid

        setup = (f"Gaussian mixture fitted to the digits; {len(args.seeds)} seed(s), {args.steps} steps, batch "
                 f"{args.batch_size}, UNet {args.model_channels} channels; excess error on {args.eval_size} fixed "
                 f"images x {MIXTURE_LEVELS} levels every {args.eval_every} steps, sample scores on "
                 f"{args.fd_samples} samples at the end; {minutes:.1f} min total")
        write_mixture_report(out, arms, setup, sigma_grid(MIXTURE_LEVELS, 0.05, 20.0).tolist())
    else:
        setup = (f"{len(args.seeds)} seed(s), {args.steps} steps, batch {args.batch_size}, UNet "
                 f"{args.model_channels} channels, FD on {args.fd_samples} samples every {args.eval_every} steps; "
                 f"{minutes:.1f} min total")
        write_report(out, arms, setup)
    print(f"\n{(out / 'results.md').read_text()}\nwrote {out / 'curves.csv'}, {out / 'convergence.png'}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
