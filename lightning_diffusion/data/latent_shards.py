"""Latent shards on disk: what ``lightning-diffusion encode`` writes and :class:`LatentDataModule` reads.

A latent folder holds (docs/latents.md, "Shard format")::

    latents.json                    manifest: autoencoder, source, counts, shapes, storage dtype
    shard-00000.labels.npy          int64 [n]
    shard-00000.moments.npy         [n, 2, c, h, w]: the encoder's mean and std per latent
    ...
    normalization.json              per-channel mean and std of the latents (docs/algorithms.md eq. 8.1), written last

Every file is written atomically (``lightning_diffusion.io.atomic_write``); a shard's moments are
written after its labels, so a shard is complete exactly when its moments file exists. The
moments are read memory-mapped: a set larger than RAM trains without being loaded.
"""

from __future__ import annotations

import json
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
    """All shards of a finished encode, memory-mapped and checked against the manifest.

    ``moments(indices)`` returns (mean, std) float32 arrays ``[len(indices), c, h, w]`` for global
    image indices; ``labels`` is every label, in memory (8 bytes per image).
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
        self._moments = []
        labels = []
        for index, size in enumerate(sizes):
            moments_path, labels_path = shard_files(self.root, index)
            if not moments_path.is_file():
                raise FileNotFoundError(f"{setting}: shard {index} of {len(sizes)} is missing in '{self.root}'; run "
                                        "the encode again: it continues where it stopped.")
            moments = np.load(moments_path, mmap_mode="r", allow_pickle=False)
            shard_labels = np.load(labels_path, allow_pickle=False)
            if moments.shape != (size, 2, *self.latent_shape) or shard_labels.shape != (size,):
                raise ValueError(f"{setting}: shard {index} in '{self.root}' holds moments {moments.shape} and "
                                 f"labels {shard_labels.shape}; the manifest says {size} latents of "
                                 f"{self.latent_shape}. Encode again into an empty folder.")
            bad = shard_labels[(shard_labels < 0) | (shard_labels >= max(self.num_classes, 1))]
            if bad.size:
                raise ValueError(f"{setting}: shard {index} in '{self.root}' has label {int(bad[0])}, outside the "
                                 f"manifest's {self.num_classes} classes; encode again into an empty folder.")
            self._moments.append(moments)
            labels.append(shard_labels)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self._starts = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return self.count

    def moments(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float32 ``[n, c, h, w]`` of the images at ``indices`` (any order)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), 2, *self.latent_shape), dtype=np.float32)
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        for s in np.unique(shard):  # one fancy-index read per shard touched
            rows = np.nonzero(shard == s)[0]
            out[rows] = self._moments[s][indices[rows] - self._starts[s]]
        return out[:, 0], out[:, 1]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``ddp_spawn``, worker processes) without the mapped arrays: they are opened again."""
        state = self.__dict__.copy()
        state["_moments"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._moments = [np.load(shard_files(self.root, i)[0], mmap_mode="r", allow_pickle=False)
                         for i in range(len(self._starts) - 1)]


def normalization_stats(shards: LatentShards, chunk: int = 65536) -> dict[str, list[float]]:
    """Per-channel mean and std of the latents ``z = mean + std * noise`` over the whole set (docs/algorithms.md eq. 8.1).

    Exact, without drawing noise: E[z] is the average encoder mean and E[z^2] the average of
    ``mean^2 + std^2``. Accumulated in float64 a chunk at a time (the set need not fit in memory).
    """
    channels = shards.latent_shape[0]
    total, square = np.zeros(channels), np.zeros(channels)
    for start in range(0, len(shards), chunk):
        mean, std = shards.moments(np.arange(start, min(start + chunk, len(shards))))
        mean, std = mean.astype(np.float64), std.astype(np.float64)
        total += mean.sum(axis=(0, 2, 3))
        square += (mean * mean + std * std).sum(axis=(0, 2, 3))
    per_channel = len(shards) * shards.latent_shape[1] * shards.latent_shape[2]
    mu = total / per_channel
    sd = np.sqrt(np.maximum(square / per_channel - mu * mu, 0.0))
    return {"mean": mu.tolist(), "std": sd.tolist()}
