"""``lightning-diffusion-phema``: list EMA snapshots of a run and rebuild weights for any sigma_rel.

Post-hoc reconstruction, ALGORITHMS.md 3.5. Pure torch (no Lightning import): a Lightning
checkpoint is a plain dict, so the newest training checkpoint of the run serves as template,
its ``state_dict`` entries named in the snapshots are replaced, and the optimizer, scheduler and
PostHocEMA states are dropped. The result loads with ``lightning-diffusion validate|predict
--ckpt_path``.

Example::

    lightning-diffusion-phema list lightning_logs/version_0
    lightning-diffusion-phema rebuild lightning_logs/version_0 --sigma_rel 0.08 0.12 --out rebuilt/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .snapshots import _atomic_write, list_snapshots, reconstruct

__all__ = ["main", "find_snapshot_dir", "newest_checkpoint", "rebuild_checkpoint"]

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
    """The most recently written ``*.ckpt`` below ``run_dir`` (None if there is none)."""
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


def _list(args: argparse.Namespace) -> None:
    directory = find_snapshot_dir(args.run_dir)
    print(f"{directory}:")
    for entry in list_snapshots(directory):
        print(f"  nimg={entry['nimg']:>12d}  sigma_rel={entry['sigma_rel']:.4f}  gamma={entry['gamma']:8.3f}  "
              f"{entry['dtype']}  {Path(entry['file']).name}")


def _rebuild(args: argparse.Namespace) -> None:
    entries = list_snapshots(find_snapshot_dir(args.run_dir))
    nimg = args.nimg if args.nimg is not None else max(e["nimg"] for e in entries)
    template_path = Path(args.template) if args.template else newest_checkpoint(args.run_dir)
    template = torch.load(template_path, map_location="cpu", weights_only=True) if template_path else None
    out_dir = Path(args.out or Path(args.run_dir) / "phema_rebuilt")
    results = reconstruct([e["file"] for e in entries], args.sigma_rel, out_nimg=nimg)
    for sigma_rel, weights in zip(args.sigma_rel, results):
        if template is not None:
            payload, path = rebuild_checkpoint(template, weights, sigma_rel, nimg), \
                out_dir / f"phema-{nimg:012d}-{sigma_rel:.4f}.ckpt"
        else:  # no training checkpoint: plain weights for load_state_dict
            payload, path = weights, out_dir / f"weights-{nimg:012d}-{sigma_rel:.4f}.pt"
        _atomic_write(path, lambda tmp, p=payload: torch.save(p, tmp))
        print(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-diffusion-phema", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list the EMA snapshots of a run")
    listing.add_argument("run_dir")
    listing.set_defaults(run=_list)
    rebuild = sub.add_parser("rebuild", help="rebuild weights for one or several sigma_rel")
    rebuild.add_argument("run_dir")
    rebuild.add_argument("--sigma_rel", type=float, nargs="+", required=True)
    rebuild.add_argument("--nimg", type=int, default=None, help="target images seen (default: the last snapshot)")
    rebuild.add_argument("--template", default=None, help="checkpoint to copy (default: the run's newest)")
    rebuild.add_argument("--out", default=None, help="output folder (default: <run_dir>/phema_rebuilt)")
    rebuild.set_defaults(run=_rebuild)
    return parser


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point ``lightning-diffusion-phema``."""
    parsed = _parser().parse_args(args)
    try:
        parsed.run(parsed)
    except ValueError as error:  # bad sigma_rel, refused snapshot file, nothing to reconstruct from
        raise SystemExit(f"lightning-diffusion-phema: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
