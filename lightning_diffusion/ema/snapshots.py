"""EMA snapshot files and post-hoc reconstruction from them (docs/algorithms.md 3.4, 3.5).

A snapshot is a plain dict ``{"sigma_rel", "gamma", "nimg", "state_dict", "dtype"}`` written with
``torch.save`` through :func:`lightning_diffusion.io.atomic_write` (temp file, fsync, rename), and
read back only with ``torch.load(weights_only=True)``: a crafted file cannot run code, it is refused.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..io import atomic_write
from .profiles import check_sigma_rel, solve_posthoc_coefficients
from .shard_files import group_snapshots, whole_state

__all__ = ["snapshot_name", "save_snapshot", "load_snapshot", "write_manifest", "load_manifest", "list_snapshots",
           "reconstruct"]

SNAPSHOT_KEYS = ("sigma_rel", "gamma", "nimg", "state_dict", "dtype")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
MANIFEST = "manifest.json"


def snapshot_name(nimg: int, sigma_rel: float) -> str:
    return f"phema-{int(nimg):012d}-{sigma_rel:.4f}.pt"


def save_snapshot(path: str | Path, state_dict: dict[str, Tensor], sigma_rel: float, gamma: float, nimg: int,
                  dtype: str = "float32", shard: dict[str, Any] | None = None) -> Path:
    """Write one profile atomically; floating tensors are stored in ``dtype`` ("float32" or "float16").

    ``shard``: the rows' layout when ``state_dict`` holds one rank's FSDP2 shard (:mod:`.shard_files`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"snapshot dtype={dtype!r} must be one of {sorted(DTYPES)}.")
    tensors = {k: (v.detach().to("cpu", DTYPES[dtype]) if v.is_floating_point() else v.detach().cpu())
               for k, v in state_dict.items()}
    payload = {"sigma_rel": float(sigma_rel), "gamma": float(gamma), "nimg": int(nimg),
               "state_dict": tensors, "dtype": dtype}
    if shard is not None:
        payload["shard"] = shard
    path = Path(path)
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_snapshot(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a snapshot with ``weights_only=True``; anything else is refused with a ValueError."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path} is not a loadable EMA snapshot (read with torch.load(weights_only=True), "
                         f"which refuses anything but plain tensors and numbers): {error}") from None
    if not isinstance(data, dict) or any(k not in data for k in SNAPSHOT_KEYS) or \
            not isinstance(data["state_dict"], dict):
        raise ValueError(f"{path} is not an EMA snapshot: it needs the keys {list(SNAPSHOT_KEYS)}.")
    return data


def write_manifest(directory: str | Path, entries: list[dict[str, Any]]) -> Path:
    """``manifest.json``: one entry per snapshot ``{"file", "nimg", "sigma_rel", "gamma"}``, atomic."""
    path = Path(directory) / MANIFEST
    text = json.dumps({"snapshots": sorted(entries, key=lambda e: (e["nimg"], e["sigma_rel"]))}, indent=1)
    return atomic_write(path, lambda f: f.write(text.encode()))


def load_manifest(directory: str | Path) -> list[dict[str, Any]]:
    """Entries of ``manifest.json`` in ``directory`` ([] when there is none)."""
    path = Path(directory) / MANIFEST
    return list(json.loads(path.read_text())["snapshots"]) if path.exists() else []


def _header(path: str | Path) -> dict[str, Any]:
    data = load_snapshot(path, mmap=True)
    shard = data.get("shard")
    return {"file": str(path), "nimg": int(data["nimg"]), "sigma_rel": float(data["sigma_rel"]),
            "gamma": float(data["gamma"]), "dtype": str(data["dtype"]), "shard": shard if isinstance(shard, dict) else None}


def list_snapshots(directory: str | Path) -> list[dict[str, Any]]:
    """One entry per snapshot in ``directory``, read from the files (not the manifest), in time order.

    Entries: ``{"file", "files", "layout", "nimg", "sigma_rel", "gamma", "dtype"}``; a sharded snapshot
    (one file per rank, :mod:`.shard_files`) is one entry whose ``files`` are its shards in rank order.
    """
    return group_snapshots([_header(path) for path in sorted(Path(directory).glob("phema-*.pt"))])


def _select(headers: list[dict[str, Any]], out_nimg: int | None) -> tuple[list[dict[str, Any]], int]:
    usable = [h for h in headers if h["nimg"] > 0]
    if out_nimg is None:
        out_nimg = max((h["nimg"] for h in usable), default=0)
    usable = [h for h in usable if h["nimg"] <= out_nimg]
    if not usable:
        raise ValueError(f"no EMA snapshot with 0 < nimg <= out_nimg={out_nimg} to reconstruct from.")
    return usable, int(out_nimg)


def _weighted_sum(snapshots: Sequence[Sequence[str]], weights: Sequence[float], dtype: torch.dtype
                  ) -> dict[str, Tensor]:
    """sum_i w_i theta_i streamed snapshot by snapshot: the accumulator plus one snapshot in memory."""
    acc: dict[str, Tensor] = {}
    for files, weight in zip(snapshots, weights):
        state = whole_state(files, lambda f: load_snapshot(f, mmap=True))
        for key, value in state.items():
            if not value.is_floating_point():
                acc[key] = value.clone()  # integer buffers: the latest file wins (files are in time order)
            elif key not in acc:
                acc[key] = value.to(dtype) * weight
            else:
                acc[key].add_(value.to(dtype), alpha=weight)
        del state
    return acc


def reconstruct(snapshot_paths: Sequence[str | Path | Sequence[str | Path]], out_sigma_rels: Sequence[float],
                out_nimg: int | None = None, dtype: torch.dtype = torch.float32,
                accumulate_dtype: torch.dtype = torch.float64) -> list[dict[str, Tensor]]:
    """Post-hoc EMA weights, one state_dict per requested sigma_rel at ``out_nimg`` (default: the last).

    Each item of ``snapshot_paths`` is a snapshot file, or the list of a sharded snapshot's files
    (``list_snapshots(...)[i]["files"]``): the result is whole tensors either way. Uses every snapshot
    with ``0 < nimg <= out_nimg``; one output at a time, so memory holds at most the accumulator and
    the snapshot being read (plus the finished outputs returned).
    """
    for s in out_sigma_rels:
        check_sigma_rel(s, "out_sigma_rels")
    headers = []
    for item in snapshot_paths:
        files = [str(item)] if isinstance(item, (str, Path)) else [str(f) for f in item]
        header = _header(files[0])
        headers.append({**header, "file": files})
    usable, out_nimg = _select(sorted(headers, key=lambda h: h["nimg"]), out_nimg)
    X = solve_posthoc_coefficients([h["nimg"] for h in usable], [h["sigma_rel"] for h in usable],
                                   out_nimg, out_sigma_rels)
    files = [h["file"] for h in usable]
    outputs = []
    for j in range(len(out_sigma_rels)):
        acc = _weighted_sum(files, X[:, j].tolist(), accumulate_dtype)
        outputs.append({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in acc.items()})
    return outputs
