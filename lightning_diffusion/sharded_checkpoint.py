"""Read a sharded (FSDP2, distributed) Lightning checkpoint folder on one CPU process (docs/sharding.md).

``ModelParallelStrategy`` writes a checkpoint as a folder: each rank's rows of the weights and
optimizer state in ``__<rank>_0.distcp`` files, their layout in ``.metadata``, and everything else
(hyperparameters, callbacks' state, loops) in ``meta.pt`` from rank 0. :func:`load_whole_checkpoint`
returns the ordinary checkpoint dict an unsharded run would have written, with whole weights and
without optimizer state: what ``lightning-diffusion-phema rebuild`` copies. Only tensor entries are
read (no pickled objects), and ``meta.pt`` only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["is_sharded_checkpoint", "load_whole_checkpoint"]

META = "meta.pt"
EMA_PREFIX = "state_dict._phema."  # PostHocEMA's sharded averages (callbacks/ema_shards.py): not weights


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed checkpoint folder (``.metadata`` and ``meta.pt`` inside)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def load_whole_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint in ``path`` with its weights gathered into whole tensors on the CPU."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not (path / META).is_file():
        raise ValueError(f"{path} is a sharded checkpoint folder without its {META} (written by rank 0): it is "
                         f"incomplete; use another checkpoint.")
    checkpoint = torch.load(path / META, map_location="cpu", weights_only=True)
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    keys = {k for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and k.startswith("state_dict.") and not k.startswith(EMA_PREFIX)}
    state: dict[str, Any] = {}
    # The private loader, as torch's own dcp_to_torch_save uses: the public one fills a copy of ``state``.
    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    checkpoint["state_dict"] = dict(state.get("state_dict", {}))
    return checkpoint
