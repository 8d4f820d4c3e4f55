"""Local shards of FSDP2 parameters (docs/sharding.md): pure torch, no Lightning.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns each parameter into a ``DTensor`` sharded
along dim 0 (``Shard(0)``) over the mesh's shard dimension, and replicated over its replicate
dimension when the mesh has two (HSDP). Rows are split like ``torch.chunk``: shard ``r`` of ``N``
holds rows ``[r*c, min((r+1)*c, n))`` with ``c = ceil(n / N)``, possibly none. Code that updates or
averages weights in place (forced weight normalization, the EMA) works on :func:`local` views;
what it writes to disk says where its rows belong (:class:`ShardSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ShardSpec", "is_dtensor", "local", "shard_spec", "to_global", "full_tensor", "local_rows_of", "reshard"]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (False where distributed is absent)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The rank's own rows of a sharded parameter (a view: in-place writes reach the parameter); else itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class ShardSpec:
    """Where a rank's rows of one parameter live: ``rows [offset, offset + local rows)`` of ``shape``.

    ``shard``/``num_shards``: this rank's coordinate on the mesh dimension that shards, and its size;
    ``writer``: whether this rank is the first replica of its shard (HSDP writes each shard once).
    """

    shape: tuple[int, ...]
    offset: int
    shard: int
    num_shards: int
    writer: bool
    mesh: Any
    placements: tuple[Any, ...]


def shard_spec(tensor: Tensor) -> ShardSpec | None:
    """The :class:`ShardSpec` of a ``Shard(0)`` DTensor, ``None`` for an ordinary tensor.

    Raises ``ValueError`` for other placements (tensor parallelism, sharding on another dim): the
    EMA and snapshots of this library know FSDP's dim-0 row shards only.
    """
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    sharded = [d for d, p in enumerate(placements) if isinstance(p, Shard)]
    if len(sharded) != 1 or placements[sharded[0]] != Shard(0) or \
            any(not isinstance(p, (Shard, Replicate)) for p in placements):
        raise ValueError(f"a parameter with placements {placements} is sharded in a way this library does not "
                         f"support; only FSDP2's row sharding (Shard(0), with Replicate across nodes) is.")
    dim = sharded[0]
    shard, num_shards = mesh.get_local_rank(dim), mesh.size(dim)
    rows = tensor.shape[0]
    chunk = -(-rows // num_shards)
    offset = min(shard * chunk, rows)
    writer = all(mesh.get_local_rank(d) == 0 for d in range(mesh.ndim) if d != dim)
    return ShardSpec(tuple(tensor.shape), offset, shard, num_shards, writer, mesh, placements)


def to_global(local_rows: Tensor, spec: ShardSpec) -> Tensor:
    """A DTensor of this rank's rows laid out as ``spec`` (shares storage with ``local_rows``)."""
    from torch.distributed.tensor import DTensor

    stride = torch.empty(spec.shape, device="meta").stride()
    return DTensor.from_local(local_rows, spec.mesh, spec.placements, run_check=False, shape=torch.Size(spec.shape),
                              stride=stride)


def full_tensor(local_rows: Tensor, spec: ShardSpec | None) -> Tensor:
    """The whole tensor on every rank (a collective when sharded: every rank must call it)."""
    return local_rows if spec is None else to_global(local_rows, spec).full_tensor()


def local_rows_of(full: Tensor, spec: ShardSpec | None) -> Tensor:
    """This rank's rows of a whole tensor (e.g. an unsharded EMA state loaded into a sharded run)."""
    if spec is None:
        return full
    chunk = -(-spec.shape[0] // spec.num_shards)
    return full[spec.offset:min(spec.offset + chunk, spec.shape[0])]



def reshard(module: Any) -> None:
    """Put every FSDP2 unit below ``module`` back on its sharded parameters (a no-grad forward leaves
    the roots gathered); nothing to do for an unsharded module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
