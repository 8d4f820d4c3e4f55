"""``lightning-diffusion-phema``: list a run's EMA snapshots, rebuild weights for any sigma_rel, sweep.

Post-hoc reconstruction, docs/algorithms.md 3.5 (the math is in :mod:`lightning_diffusion.ema`). A
Lightning checkpoint is a plain dict, so the newest training checkpoint of the run serves as
template: its ``state_dict`` entries named in the snapshots are replaced, the optimizer and
scheduler states and the PostHocEMA state are dropped, and ``checkpoint["phema"]`` records
``{"sigma_rel", "nimg"}``. The result loads with ``lightning-diffusion validate|predict
--ckpt_path``. ``sweep`` rebuilds several sigma_rel and scores each with the library's own
``validate`` (in process), then writes a table, a CSV and a PNG plot. This file sits beside
``cli.py`` rather than in ``ema/`` because the sweep drives Lightning.

Example::

    lightning-diffusion-phema list lightning_logs/version_0
    lightning-diffusion-phema rebuild lightning_logs/version_0 --sigma_rel 0.08 0.12 --out rebuilt/
    lightning-diffusion-phema sweep lightning_logs/version_0 --sigma_rel 0.03 0.05 0.08 0.10 0.13 0.16 \\
        --config configs/posthoc_ema.yaml
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import torch

from .ema import check_sigma_rel, list_snapshots, reconstruct, sigma_rel_to_gamma
from .sharded_checkpoint import is_sharded_checkpoint, load_whole_checkpoint
from .io import atomic_write

__all__ = ["main", "find_snapshot_dir", "newest_checkpoint", "rebuild_checkpoint", "rebuild", "sweep"]

DROPPED = ("optimizer_states", "lr_schedulers")


def find_snapshot_dir(run_dir: str | Path) -> Path:
    """The folder holding ``phema-*.pt``: ``run_dir`` itself, ``run_dir/phema``, or the one below it."""
    run_dir = Path(run_dir)
    for candidate in (run_dir, run_dir / "phema"):
        if any(candidate.glob("phema-*.pt")):
            return candidate
    found = sorted({p.parent for p in run_dir.rglob("phema-*.pt")})
    if len(found) != 1:
        raise SystemExit(f"{run_dir}: expected one folder of phema-*.pt snapshots below it, found {len(found)}.")
    return found[0]


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written training ``*.ckpt`` below ``run_dir`` (None if there is none)."""
    ckpts = [p for p in Path(run_dir).rglob("*.ckpt") if not p.name.startswith("phema-")]
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns) if ckpts else None


def rebuild_checkpoint(template: dict[str, Any], weights: dict[str, torch.Tensor], sigma_rel: float,
                       nimg: int) -> dict[str, Any]:
    """A copy of a Lightning checkpoint holding ``weights``, without optimizer or EMA state."""
    state = dict(template["state_dict"])
    missing = [k for k in weights if k not in state]
    if missing:
        raise SystemExit(f"the template checkpoint has no entries {missing[:3]}...: snapshots and checkpoint "
                         "come from different models.")
    for key, value in weights.items():
        state[key] = value.to(state[key].dtype)
    out = {k: v for k, v in template.items() if k not in DROPPED}
    out["state_dict"] = state
    out["callbacks"] = {k: v for k, v in template.get("callbacks", {}).items() if k != "PostHocEMA"}
    out["phema"] = {"sigma_rel": float(sigma_rel), "nimg": int(nimg)}
    return out


def rebuild(run_dir: str | Path, sigma_rels: Sequence[float], nimg: int | None = None,
            template: str | Path | None = None, out: str | Path | None = None) -> list[Path]:
    """Write one checkpoint per sigma_rel (plain ``weights-*.pt`` when the run has no checkpoint)."""
    entries = list_snapshots(find_snapshot_dir(run_dir))
    nimg = nimg if nimg is not None else max(e["nimg"] for e in entries)
    template_path = Path(template) if template else newest_checkpoint(run_dir)
    template_ckpt = _read_checkpoint(template_path) if template_path else None
    out_dir = Path(out or Path(run_dir) / "phema_rebuilt")
    paths = []
    for sigma_rel, weights in zip(sigma_rels, reconstruct([e["files"] for e in entries], sigma_rels, out_nimg=nimg)):
        if template_ckpt is not None:
            payload = rebuild_checkpoint(template_ckpt, weights, sigma_rel, nimg)
            path = out_dir / f"phema-{nimg:012d}-{sigma_rel:.4f}.ckpt"
        else:  # no training checkpoint: plain weights for load_state_dict
            payload, path = weights, out_dir / f"weights-{nimg:012d}-{sigma_rel:.4f}.pt"
        atomic_write(path, lambda f, p=payload: torch.save(p, f))
        paths.append(path)
    return paths


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file, or a sharded (FSDP2) checkpoint folder gathered into whole weights on the CPU."""
    if is_sharded_checkpoint(path):
        return load_whole_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def validation_metric(config: Sequence[str], ckpt_path: str | Path, metric: str = "val/fd",
                      cli_args: Sequence[str] = ()) -> float:
    """``lightning-diffusion validate --config ... --ckpt_path ckpt_path`` in process; returns ``metric``.

    Files validate writes (its config.yaml) land beside the checkpoint.
    """
    from .cli import DiffusionCLI  # Lightning is imported only when a sweep scores something

    args = ["validate", *(a for c in config for a in ("--config", str(c))), "--ckpt_path", str(ckpt_path),
            f"--trainer.default_root_dir={Path(ckpt_path).parent}", "--trainer.enable_progress_bar=false",
            "--trainer.logger=false", "--verbose=false", *cli_args]
    with warnings.catch_warnings():  # args= while sys.argv holds the sweep's own command line: intended
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        metrics = DiffusionCLI(args=args).trainer.callback_metrics
    if metric not in metrics:
        raise SystemExit(f"validate logged no {metric!r}; it logged {sorted(metrics)}.")
    return float(metrics[metric])


def sweep(run_dir: str | Path, sigma_rels: Sequence[float], config: Sequence[str] = (), nimg: int | None = None,
          metric: str = "val/fd", out: str | Path | None = None, cli_args: Sequence[str] = (),
          mode: str = "min") -> list[dict[str, Any]]:
    """Rebuild each sigma_rel, score it with ``validate``; write ``sweep.csv`` and ``sweep.png`` to ``out``."""
    for s in sigma_rels:
        check_sigma_rel(s, "--sigma_rel")
    out_dir = Path(out or Path(run_dir) / "phema_sweep")
    config = list(config) or [_saved_config(run_dir)]
    if newest_checkpoint(run_dir) is None:
        raise SystemExit(f"{run_dir}: sweep needs a training checkpoint (*.ckpt) to rebuild into; found none.")
    rows = []
    for sigma_rel, path in zip(sigma_rels, rebuild(run_dir, sigma_rels, nimg=nimg, out=out_dir)):
        value = validation_metric(config, path, metric, cli_args)
        rows.append({"sigma_rel": float(sigma_rel), "gamma": sigma_rel_to_gamma(sigma_rel), metric: value,
                     "checkpoint": str(path)})
    finite = [r for r in rows if math.isfinite(r[metric])]
    pick = min if mode == "min" else max
    best = pick(finite, key=lambda r: r[metric]) if finite else None
    for row in rows:
        row["best"] = row is best
    _write_csv(out_dir / "sweep.csv", rows, metric)
    _plot(out_dir / "sweep.png", rows, metric)
    return rows


def _saved_config(run_dir: str | Path) -> str:
    found = sorted(Path(run_dir).rglob("config.yaml"))
    if len(found) != 1:
        raise SystemExit(f"{run_dir}: pass --config (found {len(found)} saved config.yaml below the run folder).")
    return str(found[0])


def _write_csv(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    fields = ["sigma_rel", "gamma", metric, "best", "checkpoint"]

    def write(f: BinaryIO) -> None:
        text = io.TextIOWrapper(f, newline="")
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in rows)
        text.flush()
        text.detach()  # atomic_write closes f
    atomic_write(path, write)


def _plot(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot: no global backend, no display

    fig = Figure(figsize=(5, 3.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r["sigma_rel"] for r in rows], [r[metric] for r in rows], "o-")
    for r in rows:
        if r["best"]:
            ax.plot([r["sigma_rel"]], [r[metric]], "r*", markersize=14, label=f"best: sigma_rel={r['sigma_rel']:g}")
            ax.legend()
    ax.set(xlabel="sigma_rel", ylabel=metric, title=f"post-hoc EMA sweep at nimg={_nimg(rows)}")
    ax.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _nimg(rows: list[dict[str, Any]]) -> str:
    return Path(rows[0]["checkpoint"]).name.split("-")[1].lstrip("0") if rows else "?"


def _print_table(rows: list[dict[str, Any]], metric: str, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"post-hoc EMA sweep, nimg={_nimg(rows)}", caption=f"written to {out_dir}")
    for name in ("sigma_rel", "gamma", metric, ""):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(f"{r['sigma_rel']:.4f}", f"{r['gamma']:.2f}", f"{r[metric]:.4g}", "<- best" if r["best"] else "",
                      style="bold green" if r["best"] else None)
    Console().print(table)


def _list(args: argparse.Namespace) -> None:
    directory = find_snapshot_dir(args.run_dir)
    print(f"{directory}:")
    for entry in list_snapshots(directory):
        print(f"  nimg={entry['nimg']:>12d}  sigma_rel={entry['sigma_rel']:.4f}  gamma={entry['gamma']:8.3f}  "
              f"{entry['dtype']}  {_files(entry)}")


def _files(entry: dict[str, Any]) -> str:
    """The file name, or for a sharded snapshot the first shard's name and the layout."""
    name = Path(entry["file"]).name
    return name if entry["layout"] == "whole" else f"{name} (+{len(entry['files']) - 1} more: {entry['layout']})"


def _rebuild(args: argparse.Namespace) -> None:
    if not args.template and newest_checkpoint(args.run_dir) is None:  # every CLI fit leaves last.ckpt
        print(f"lightning-diffusion-phema: {args.run_dir} holds no training checkpoint (*.ckpt) to copy, so this "
              f"writes plain weights-*.pt (a state_dict for load_state_dict) instead of phema-*.ckpt; pass "
              f"--template <a .ckpt of this model> for checkpoints that validate and predict load", file=sys.stderr)
    for path in rebuild(args.run_dir, args.sigma_rel, args.nimg, args.template, args.out):
        print(path)


def _sweep(args: argparse.Namespace) -> None:
    out_dir = Path(args.out or Path(args.run_dir) / "phema_sweep")
    rows = sweep(args.run_dir, args.sigma_rel, args.config or (), args.nimg, args.metric, out_dir, args.cli_args,
                 args.mode)
    _print_table(rows, args.metric, out_dir)
    print(f"wrote {out_dir / 'sweep.csv'} and {out_dir / 'sweep.png'}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-diffusion-phema", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list the EMA snapshots of a run")
    listing.add_argument("run_dir")
    listing.set_defaults(run=_list)
    for name, run, helptext in (("rebuild", _rebuild, "rebuild weights for one or several sigma_rel"),
                                ("sweep", _sweep, "rebuild several sigma_rel and score each with validate")):
        command = sub.add_parser(name, help=helptext, allow_abbrev=False)
        command.add_argument("run_dir")
        command.add_argument("--sigma_rel", type=float, nargs="+", required=True)
        command.add_argument("--nimg", type=int, default=None, help="target images seen (default: the last snapshot)")
        folder = "phema_rebuilt" if name == "rebuild" else "phema_sweep"
        command.add_argument("--out", default=None, help=f"output folder (default: <run_dir>/{folder})")
        command.set_defaults(run=run)
    sub.choices["rebuild"].add_argument("--template", default=None,
                                        help="checkpoint to copy (default: the run's newest)")
    sweep_args = sub.choices["sweep"]
    sweep_args.add_argument("--config", action="append",
                            help="the run's recipe, repeatable (default: the run's saved config.yaml)")
    sweep_args.add_argument("--metric", default="val/fd", help="the logged metric to compare (default: val/fd)")
    sweep_args.add_argument("--mode", choices=("min", "max"), default="min", help="which end of the metric is best")
    sweep_args.epilog = "Other --key=value arguments are passed to `lightning-diffusion validate`."
    return parser


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point ``lightning-diffusion-phema``."""
    parser = _parser()
    parsed, extra = parser.parse_known_args(args)
    if extra and parsed.command != "sweep":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    parsed.cli_args = extra
    try:
        parsed.run(parsed)
    except (ValueError, SystemExit) as error:  # bad sigma_rel, refused or incomplete snapshots, no snapshot folder
        if isinstance(error, SystemExit) and not isinstance(error.code, str):
            raise  # argparse's own exits (usage errors: 2, --help: 0)
        message = error.code if isinstance(error, SystemExit) else str(error)
        print(f"lightning-diffusion-phema: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
