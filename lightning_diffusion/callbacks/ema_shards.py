"""PostHocEMA on FSDP2 shards (docs/sharding.md): snapshot files per shard and the distributed checkpoint.

Each rank's :class:`~lightning_diffusion.ema.PowerFunctionEMA` holds its own rows of each parameter.
A sharded snapshot is one file per shard, written by the first replica of that shard (under HSDP
the other nodes hold the same rows); a distributed checkpoint stores the averages as ``DTensor``
entries of its sharded ``state_dict`` under ``_phema.<profile>.<name>``, so each rank writes its
rows and a resume on another number of ranks reads the rows it now owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..ema import PowerFunctionEMA, save_snapshot, shard_header, shard_snapshot_name
from ..ema.shard_files import name_layout

__all__ = ["CHECKPOINT_PREFIX", "sharded_checkpoint_entries", "load_sharded_averages", "write_once",
           "write_shard_snapshot"]

CHECKPOINT_PREFIX = "_phema."


def sharded_checkpoint_entries(ema: PowerFunctionEMA) -> dict[str, Tensor]:
    """The averages as DTensors, keyed for the checkpoint's sharded ``state_dict``."""
    return {CHECKPOINT_PREFIX + k: v for k, v in ema.global_averages().items()}


def load_sharded_averages(ema: PowerFunctionEMA, ckpt_path: str | None) -> None:
    """Read the averages of a distributed checkpoint into ``ema`` (a collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    if not ckpt_path or not Path(ckpt_path).is_dir():
        raise ValueError(f"PostHocEMA: the checkpoint's EMA averages are in its sharded state_dict, but the "
                         f"checkpoint folder {ckpt_path!r} is not here to read them from.")
    state = {"state_dict": sharded_checkpoint_entries(ema)}
    dcp.load(state, checkpoint_id=ckpt_path)
    averages = {f"{i}.{k}": a for i, avg in enumerate(ema.averages)
                for k, a, spec in zip(ema.param_names, avg, ema.specs) if spec is not None}
    for key, average in averages.items():
        loaded = state["state_dict"][CHECKPOINT_PREFIX + key].to_local()
        if loaded.data_ptr() != average.data_ptr():  # DCP may have loaded into new storage
            average.copy_(loaded)


def write_once(path: Path, state: dict[str, Tensor], sigma_rel: float, gamma: float, nimg: int, dtype: str,
               shard: dict[str, Any] | None = None) -> None:
    """Write a snapshot file unless it exists (one written before a crash and resume is never rewritten),
    or the folder holds this snapshot in another layout (written before a resume on another number of
    ranks): one snapshot in two layouts would make the folder unreadable."""
    if path.exists():
        rank_zero_info(f"PostHocEMA: keeping existing snapshot {path}")
        return
    stem, layout = name_layout(path.name)
    others = [p.name for p in path.parent.glob(f"{stem}*.pt") if name_layout(p.name)[1] != layout]
    if others:
        rank_zero_info(f"PostHocEMA: keeping the existing snapshot {others[0]} (another layout) instead of {path.name}")
        return
    save_snapshot(path, state, sigma_rel, gamma, nimg, dtype, shard=shard)


def write_shard_snapshot(directory: Path, ema: PowerFunctionEMA, index: int, nimg: int, prefix: str,
                         dtype: str) -> dict[str, Any]:
    """This rank's file of profile ``index`` (if it is its shard's writer); returns the manifest entry."""
    specs = [spec for spec in ema.specs if spec is not None]
    shard, count, writer = specs[0].shard, specs[0].num_shards, specs[0].writer
    sigma_rel, gamma = ema.sigma_rels[index], ema.gammas[index]
    files = [shard_snapshot_name(nimg, sigma_rel, r, count) for r in range(count)]
    if writer:
        sharded = [(prefix + k, spec) for k, spec in zip(ema.param_names, ema.specs) if spec is not None]
        header = shard_header([k for k, _ in sharded], [spec.offset for _, spec in sharded],
                              [spec.shape for _, spec in sharded], shard, count)
        state = {prefix + k: v for k, v in ema.profile_state_dict(index).items()}
        write_once(directory / files[shard], state, sigma_rel, gamma, nimg, dtype, shard=header)
    return {"file": files[0], "files": files, "nimg": nimg, "sigma_rel": sigma_rel, "gamma": gamma,
            "layout": f"{count} shards"}

