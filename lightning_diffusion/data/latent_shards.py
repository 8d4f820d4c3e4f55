"""Latent shards on disk: what ``lightning-diffusion encode`` writes and :class:`LatentDataModule` reads.

A latent folder holds (docs/latents.md, "Shard format")::

    latents.json                    manifest: autoencoder, source, counts, shapes, storage dtype
    shard-00000.labels.npy          int64 [n]
    shard-00000.moments.npy         [n, 2, c, h, w]: the encoder's mean and std per latent
    ...
    normalization.json              per-channel mean and std of the latents (docs/algorithms.md eq. 8.1), written last

Every file is written atomically (``lightning_diffusion.io.atomic_write``); a shard's moments are
written after its labels, so a shard is complete exactly when its moments file exists. Rows are
read from disk as batches need them (:class:`LatentShards`): a set larger than RAM trains
without being loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lightning_diffusion.io import atomic_write

__all__ = ["MANIFEST", "NORMALIZATION", "LatentShards", "normalization_stats", "read_json", "shard_files",
           "write_json", "write_shard"]

MANIFEST = "latents.json"
NORMALIZATION = "normalization.json"
FORMAT = 1
STORAGE_DTYPES = ("float32", "float16")


def shard_files(root: Path, index: int) -> tuple[Path, Path]:
    """(moments, labels) paths of shard ``index``."""
    return root / f"shard-{index:05d}.moments.npy", root / f"shard-{index:05d}.labels.npy"


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def read_json(path: Path, setting: str) -> dict[str, Any]:
    """A manifest or normalization file; a missing or unreadable one is one sentence naming ``setting``."""
    if not path.is_file():
        raise FileNotFoundError(f"{setting}: '{path.parent}' has no {path.name}; encode the images first "
                                "(lightning-diffusion encode), or let it finish if it was interrupted.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{setting}: '{path}' is not a readable JSON file ({error}).") from error
    if not isinstance(data, dict):
        raise ValueError(f"{setting}: '{path}' does not hold a JSON object.")
    return data


def write_shard(root: Path, index: int, mean: np.ndarray, std: np.ndarray, labels: np.ndarray, dtype: str) -> None:
    """Shard ``index``: labels first, then the moments, each atomically (the moments file marks it complete)."""
    moments_path, labels_path = shard_files(root, index)
    moments = np.stack([mean, std], axis=1).astype(dtype)
    atomic_write(labels_path, lambda f: np.save(f, labels.astype(np.int64), allow_pickle=False))
    atomic_write(moments_path, lambda f: np.save(f, moments, allow_pickle=False))


def shard_sizes(count: int, shard_size: int) -> list[int]:
    """Images per shard: ``shard_size`` each, the last one the remainder."""
    return [min(shard_size, count - start) for start in range(0, count, shard_size)]


class LatentShards:
    """All shards of a finished encode, checked against the manifest, read a row at a time.

    ``moments(indices)`` returns (mean, std) float32 arrays ``[len(indices), c, h, w]`` for global
    image indices; ``labels`` is every label, in memory (8 bytes per image). Rows are read with
    ``os.pread`` at offsets taken from each file's ``.npy`` header, not through a memory map: the
    pages then stay in the kernel's page cache instead of the training process's resident memory,
    which stays flat however large the set (``benchmarks/latents.py``).
    """

    def __init__(self, root: str | Path, setting: str = "LatentDataModule.path") -> None:
        self.root = Path(root).expanduser()
        self.setting = setting
        self.manifest = read_json(self.root / MANIFEST, setting)
        try:
            self.count = int(self.manifest["count"])
            self.latent_shape = tuple(int(v) for v in self.manifest["latent_shape"])
            self.num_classes = int(self.manifest["source"]["num_classes"])
            sizes = shard_sizes(self.count, int(self.manifest["shard_size"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{setting}: '{self.root / MANIFEST}' is not a latent manifest ({error!r}).") from None
        labels = []
        self._layout = []  # per shard: (data offset in the file, dtype)
        for index, size in enumerate(sizes):
            moments_path, labels_path = shard_files(self.root, index)
            if not moments_path.is_file():
                raise FileNotFoundError(f"{setting}: shard {index} of {len(sizes)} is missing in '{self.root}'; run "
                                        "the encode again: it continues where it stopped.")
            shape, offset, dtype = _npy_layout(moments_path, setting)
            shard_labels = np.load(labels_path, allow_pickle=False)
            if shape != (size, 2, *self.latent_shape) or shard_labels.shape != (size,):
                raise ValueError(f"{setting}: shard {index} in '{self.root}' holds moments {shape} and labels "
                                 f"{shard_labels.shape}; the manifest says {size} latents of {self.latent_shape}. "
                                 "Encode again into an empty folder.")
            bad = shard_labels[(shard_labels < 0) | (shard_labels >= max(self.num_classes, 1))]
            if bad.size:
                raise ValueError(f"{setting}: shard {index} in '{self.root}' has label {int(bad[0])}, outside the "
                                 f"manifest's {self.num_classes} classes; encode again into an empty folder.")
            self._layout.append((offset, dtype))
            labels.append(shard_labels)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self._starts = np.cumsum([0] + sizes)
        self._files: list[int] | None = None  # descriptors, opened at the first read (also after pickling)

    def __len__(self) -> int:
        return self.count

    def _rows(self, shard: int, first: int, count: int) -> np.ndarray:
        """``count`` consecutive rows ``[count, 2, c, h, w]`` of one shard, in one read."""
        if self._files is None:
            self._files = [os.open(shard_files(self.root, i)[0], os.O_RDONLY) for i in range(len(self._layout))]
        offset, dtype = self._layout[shard]
        row = 2 * int(np.prod(self.latent_shape)) * dtype.itemsize
        data = os.pread(self._files[shard], row * count, offset + row * first)
        return np.frombuffer(data, dtype=dtype).reshape(count, 2, *self.latent_shape)

    def moments(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float32 ``[n, c, h, w]`` of the images at ``indices`` (any order)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), 2, *self.latent_shape), dtype=np.float32)
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        for k in np.argsort(indices, kind="stable"):  # in file order: kinder to the disk's read-ahead
            out[k] = self._rows(int(shards[k]), int(indices[k] - self._starts[shards[k]]), 1)[0]
        return out[:, 0], out[:, 1]

    def blocks(self, rows: int = 4096):
        """(mean, std) float32 blocks of up to ``rows`` consecutive images, every image once, in order."""
        for shard in range(len(self._layout)):
            size = int(self._starts[shard + 1] - self._starts[shard])
            for first in range(0, size, rows):
                block = self._rows(shard, first, min(rows, size - first)).astype(np.float32)
                yield block[:, 0], block[:, 1]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``ddp_spawn``, worker processes) without the descriptors: each process opens its own."""
        state = self.__dict__.copy()
        state["_files"] = None
        return state

    def __del__(self) -> None:
        for fd in self.__dict__.get("_files") or []:
            try:
                os.close(fd)
            except OSError:
                pass


def _npy_layout(path: Path, setting: str) -> tuple[tuple[int, ...], int, np.dtype]:
    """Shape, data offset and dtype of a C-ordered ``.npy`` file, from its header (no pickle possible)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as error:
        raise ValueError(f"{setting}: '{path}' is not a NumPy .npy file ({error}).") from error
    if fortran or dtype.hasobject or dtype.name not in STORAGE_DTYPES:
        raise ValueError(f"{setting}: '{path}' holds {dtype} data; shards hold C-ordered "
                         f"{' or '.join(STORAGE_DTYPES)} moments.")
    return tuple(shape), offset, dtype


def normalization_stats(shards: LatentShards, chunk: int = 65536) -> dict[str, list[float]]:
    """Per-channel mean and std of the latents ``z = mean + std * noise`` over the whole set (docs/algorithms.md eq. 8.1).

    Exact, without drawing noise: E[z] is the average encoder mean and E[z^2] the average of
    ``mean^2 + std^2``. Accumulated in float64 a chunk at a time (the set need not fit in memory).
    """
    channels = shards.latent_shape[0]
    total, square = np.zeros(channels), np.zeros(channels)
    for mean, std in shards.blocks(chunk):
        mean, std = mean.astype(np.float64), std.astype(np.float64)
        total += mean.sum(axis=(0, 2, 3))
        square += (mean * mean + std * std).sum(axis=(0, 2, 3))
    per_channel = len(shards) * shards.latent_shape[1] * shards.latent_shape[2]
    mu = total / per_channel
    sd = np.sqrt(np.maximum(square / per_channel - mu * mu, 0.0))
    return {"mean": mu.tolist(), "std": sd.tolist()}
