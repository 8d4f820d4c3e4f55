"""AtomicCheckpointIO: Lightning checkpoints written with temp file, fsync and rename.

Lightning's ``TorchCheckpointIO`` serializes the whole checkpoint into memory and writes it through
an fsspec transaction whose temp file lives in the system temp folder; when that is another file
system than the checkpoint folder, the final "rename" is a copy onto the final name, so a process
killed then leaves a truncated ``.ckpt`` (and for ``last.ckpt`` destroys the previous good one).
This plugin writes local checkpoints with :func:`lightning_diffusion.io.atomic_write` instead:
``torch.save`` streams into ``.<name>.tmp-<pid>`` beside the target, which is fsynced and
``os.replace``-d onto it. Remote paths (``s3://...``) keep Lightning's implementation.

The CLI uses it by default (unless a CheckpointIO is configured); from Python::

    pl.Trainer(plugins=[AtomicCheckpointIO()])

The strategy owns ``checkpoint_io`` and calls it on global rank 0 only, so it works unchanged
under DDP.
"""

from __future__ import annotations

from typing import Any, Optional

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .io import atomic_write

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: a crash mid-write keeps the previous file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        fs, local_path = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)  # its TypeError / remote path
        atomic_write(local_path, lambda f: torch.save(checkpoint, f))
