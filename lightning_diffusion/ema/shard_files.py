"""Sharded EMA snapshots: one file per shard of an FSDP2 run, rebuilt on one CPU (docs/sharding.md).

A sharded snapshot of profile ``sigma_rel`` at ``nimg`` is ``N`` files
``phema-<nimg>-<sigma_rel>.shard-<r>-of-<N>.pt``, each an ordinary snapshot (the keys of
:mod:`.snapshots`, read with ``torch.load(weights_only=True)``) whose ``state_dict`` holds rank
``r``'s rows of every parameter, plus ``"shard": {"index", "count", "offsets", "shapes"}``: the
first row of each parameter and each whole shape. Buffers (FSDP2 does not shard them) are whole in
every file. :func:`group_snapshots` checks that a set is complete and of one layout;
:func:`whole_state` concatenates the rows into the state dict an unsharded run would have written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["shard_snapshot_name", "name_layout", "shard_header", "group_snapshots", "whole_state"]

_SHARD_NAME = re.compile(r"\.shard-\d+-of-(\d+)\.pt$")

def shard_snapshot_name(nimg: int, sigma_rel: float, index: int, count: int) -> str:
    return f"phema-{int(nimg):012d}-{sigma_rel:.4f}.shard-{index:05d}-of-{count:05d}.pt"


def name_layout(name: str) -> tuple[str, str]:
    """``(stem, layout)`` of a snapshot file's name: ``("phema-<nimg>-<sigma_rel>", "2")`` for a shard of 2,
    ``(..., "whole")`` for a whole snapshot (the names :func:`shard_snapshot_name` and ``snapshot_name`` write)."""
    match = _SHARD_NAME.search(name)
    return (name[:match.start()], str(int(match.group(1)))) if match else (name.removesuffix(".pt"), "whole")


def shard_header(names: Sequence[str], offsets: Sequence[int], shapes: Sequence[Sequence[int]], index: int,
                 count: int) -> dict[str, Any]:
    """The ``"shard"`` entry of one file: plain ints and lists (``weights_only`` loads it)."""
    return {"index": int(index), "count": int(count), "offsets": {k: int(o) for k, o in zip(names, offsets)},
            "shapes": {k: [int(d) for d in s] for k, s in zip(names, shapes)}}


def _describe(entry: dict[str, Any]) -> str:
    return f"the snapshot nimg={entry['nimg']} sigma_rel={entry['sigma_rel']:.4f}"


def group_snapshots(headers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per snapshot from per-file headers ``{"file", "nimg", "sigma_rel", "shard"?, ...}``.

    A sharded snapshot becomes one entry with ``"files"`` in rank order and ``"layout": "N shards"``;
    a whole file keeps ``"files": [file]`` and ``"layout": "whole"``. Raises ``ValueError`` (one
    sentence) when a snapshot's files come from two layouts or a rank's file is missing.
    """
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for header in headers:
        groups.setdefault((header["nimg"], round(header["sigma_rel"], 4)), []).append(header)
    entries = []
    for files in groups.values():
        first = dict(files[0])
        counts = {h["shard"]["count"] if h.get("shard") else 0 for h in files}
        if len(counts) > 1:
            layouts = sorted(f"{c} shards" if c else "a whole file" for c in counts)
            raise ValueError(f"{_describe(first)} is in the folder in two layouts ({' and '.join(layouts)}): "
                             f"files of two runs are mixed there; keep one run's snapshots per folder.")
        count = counts.pop()
        if not count:
            if len(files) > 1:
                raise ValueError(f"{_describe(first)} is there twice: {[h['file'] for h in files]}.")
            entries.append({**first, "files": [first["file"]], "layout": "whole"})
            continue
        have = sorted(h["shard"]["index"] for h in files)
        if have != list(range(count)):
            missing = sorted(set(range(count)) - set(have))
            raise ValueError(f"{_describe(first)} was written by {count} ranks but the files of rank(s) {missing} "
                             f"are missing next to {Path(first['file']).name}; copy every rank's file, or remove "
                             f"the incomplete set.")
        ordered = sorted(files, key=lambda h: h["shard"]["index"])
        entries.append({**first, "file": ordered[0]["file"], "files": [h["file"] for h in ordered],
                        "layout": f"{count} shards"})
    return sorted(entries, key=lambda e: (e["nimg"], e["sigma_rel"]))


def whole_state(files: Sequence[str | Path], load: Any) -> dict[str, Tensor]:
    """The whole state dict of one snapshot: ``load(file)`` each shard (mmapped), rows placed at their offsets."""
    parts = [load(f) for f in files]
    if len(parts) == 1 and "shard" not in parts[0]:
        return parts[0]["state_dict"]
    shapes = parts[0]["shard"]["shapes"]
    out: dict[str, Tensor] = {}
    for key, value in parts[0]["state_dict"].items():
        if key not in shapes:  # a buffer: whole in every file
            out[key] = value
            continue
        whole = torch.empty(shapes[key], dtype=value.dtype)
        rows = 0
        for part in parts:
            piece = part["state_dict"][key]
            offset = part["shard"]["offsets"][key]
            whole[offset:offset + piece.shape[0]] = piece
            rows += piece.shape[0]
        if rows != whole.shape[0]:
            raise ValueError(f"{files[0]}: the shards of {key!r} hold {rows} rows, the parameter has {whole.shape[0]}.")
        out[key] = whole
    return out

