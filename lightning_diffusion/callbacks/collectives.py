"""Small collectives for the timestep-sampler callbacks: no barrier, no host sync, identity on one process.

Lightning's ``strategy.reduce`` / ``all_gather`` add a barrier and (for uneven shapes) host syncs
on every call; the samplers call these every step, so they use ``torch.distributed`` directly.
Every rank must call them at the same point (they are collectives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "all_reduce_mean", "all_gather_cat", "all_reduce_max_int"]


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not running)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The element-wise mean over ranks, identical on every rank (in place; returned)."""
    n = world_size()
    if n > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(n)
    return tensor


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (same shape on every rank) concatenated along dim 0, in rank order."""
    n = world_size()
    if n == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_max_int(value: int, device: torch.device) -> int:
    """The largest ``value`` over ranks (one host sync: call it once, not per step)."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
