"""LatentDataModule: trains on the latent shards ``lightning-diffusion encode`` writes (docs/latents.md).

Batches are ``(x float32 [B, c, h, w], labels int64 [B])`` with ``x = (z - shift) * scale`` per
channel (docs/algorithms.md eq. 8.2) and ``z = mean + std * noise`` drawn afresh for every image in every epoch of
the data stream (EDM2's practice), with the noise keyed by ``(seed, epoch, image)``: a resumed run
draws the same latents, whatever the devices. Validation uses the encoder means (no noise). The
shards stay on disk and are read a row at a time: a set larger than RAM trains without being loaded, and
the process's resident memory does not grow with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_diffusion.autoencoders import LatentSpace, autoencoder_from_option, build_autoencoder
from lightning_diffusion.core.seeds import stream_seed
from lightning_diffusion.data.base import ImageDataModule
from lightning_diffusion.data.latent_shards import MANIFEST, NORMALIZATION, LatentShards, read_json

__all__ = ["LatentDataModule", "LatentDataset"]

_NOISE_SALT = 0x1A7E  # keeps the latent noise stream apart from the module's training streams


class LatentDataset(Dataset):
    """The latents at ``indices`` of ``shards``, normalized by ``space``; noisy draws when ``sample``.

    With ``sample`` the dataset is *epoch keyed*: item ``epoch * len(self) + i`` is image ``i`` of
    that epoch of the stream (:class:`~lightning_diffusion.data.resumable.ImagesSeenSampler` yields
    such items), so each epoch draws new latent noise and a resume draws the same.
    """

    def __init__(self, shards: LatentShards, indices: np.ndarray, space: LatentSpace, seed: int, sample: bool):
        self.shards, self.indices, self.space, self.seed = shards, np.asarray(indices, np.int64), space, seed
        self.epoch_keyed = sample
        self.labels = torch.from_numpy(shards.labels[self.indices])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor]:
        x, labels = self.__getitems__([item])
        return x[0], labels[0]

    def __getitems__(self, items: list[int]) -> tuple[Tensor, Tensor]:
        """A batch read and normalized at once; the DataLoader calls this with a batch's items."""
        epochs, positions = np.divmod(np.asarray(items, dtype=np.int64), len(self))
        chosen = self.indices[positions]
        mean, std = (torch.from_numpy(a) for a in self.shards.moments(chosen))
        if self.epoch_keyed:
            noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(
                stream_seed(self.seed, int(e), int(i), _NOISE_SALT))) for e, i in zip(epochs, chosen)])
            mean = mean + std * noise
        return self.space.normalize(mean), self.labels[positions]

    @staticmethod
    def collate(batch: Any) -> Any:
        """The loaders' ``collate_fn``: ``__getitems__`` already returns the stacked batch."""
        return batch

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized encoder means at ``indices`` (Stable Target Field's reference stream)."""
        mean, _ = self.shards.moments(self.indices[indices.numpy()])
        return self.space.normalize(torch.from_numpy(mean)), self.labels[indices]


class LatentDataModule(ImageDataModule):
    """Latent shards as ``(x, labels)`` batches; ``channels``/``image_size`` are the latents'.

    Args:
        path: the folder ``lightning-diffusion encode`` wrote (``latents.json``, shards, ``normalization.json``).
        target_std: the per-channel standard deviation of the normalized latents (docs/algorithms.md eq. 8.2); 0.5 matches
            the library's pixel data in [-1, 1] and EDM's ``sigma_data`` (EDM2 normalizes its latents to 0.5).
        encode_from: encode this source into ``path`` on first use when ``path`` holds no finished
            encode: ``digits``, a ``.npy``/``.npz`` file, a CIFAR-10 folder or an image folder. Later
            runs reuse it; a ``path`` holding an encode of another source, autoencoder or shard size
            is refused (leave ``encode_from`` unset to train on a folder ``lightning-diffusion encode`` wrote).
        autoencoder: with ``encode_from``: ``digits`` (shipped) or a local diffusers AutoencoderKL folder.
        image_size, channels, encode_batch_size, shard_size: with ``encode_from``, as in ``lightning-diffusion encode``.

    Example::

        dm = LatentDataModule("outputs/latents/digits", encode_from="digits", autoencoder="digits")
        x, labels = next(iter(dm.train_dataloader()))  # [64, 4, 4, 4] normalized latents
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        target_std: float = 0.5,
        encode_from: str | None = None,
        autoencoder: str = "digits",
        image_size: int | None = None,
        channels: int = 3,
        encode_batch_size: int = 256,
        shard_size: int = 4096,
    ) -> None:
        super().__init__(batch_size, val_fraction, num_workers, None, seed)
        self.path = Path(path).expanduser()
        self.target_std = float(target_std)
        if not self.target_std > 0:
            raise ValueError(f"LatentDataModule.target_std: got {target_std}; give a positive number.")
        self._encode_args: dict[str, Any] | None = None
        self._encoder = None  # built here when encode_from is given; setup reuses it instead of loading it again
        self.latent_space: LatentSpace | None = None
        if encode_from is not None:
            from lightning_diffusion.data.image_sources import open_source
            from lightning_diffusion.encode import check_resumable, manifest_for

            source = open_source(encode_from, channels, image_size, setting="LatentDataModule.encode_from")
            encoder = self._encoder = autoencoder_from_option(autoencoder, setting="LatentDataModule.autoencoder")
            # A cache of another source or autoencoder (the config changed) is refused, not silently used.
            check_resumable(self.path, manifest_for(source, encoder, shard_size, "float32"), "LatentDataModule.path")
            shape, num_classes = list(encoder.latent_shape(source.image_shape)), source.num_classes
            if not self._finished():
                self._encode_args = {"source": source, "autoencoder": encoder, "batch_size": encode_batch_size,
                                     "shard_size": shard_size}
        elif self._finished():
            manifest = read_json(self.path / MANIFEST, "LatentDataModule.path")
            shape, num_classes = manifest.get("latent_shape"), manifest.get("source", {}).get("num_classes")
            if not (isinstance(shape, list) and len(shape) == 3 and isinstance(num_classes, int)):
                raise ValueError(f"LatentDataModule.path: '{self.path / MANIFEST}' is not a latent manifest.")
        else:
            raise FileNotFoundError(f"LatentDataModule.path: '{self.path}' holds no finished encode ({MANIFEST} and "
                                    f"{NORMALIZATION}); run lightning-diffusion encode, or give encode_from.")
        if shape[1] != shape[2]:
            raise ValueError(f"LatentDataModule.path: latents of {shape[1]}x{shape[2]} are not square; the networks "
                             "take square inputs.")
        self._channels, self._image_size, self._num_classes = shape[0], shape[1], num_classes

    def _finished(self) -> bool:
        return (self.path / MANIFEST).is_file() and (self.path / NORMALIZATION).is_file()

    def prepare_data(self) -> None:
        """Encode ``encode_from`` on first use (one process per node; later runs read the cache)."""
        if self._encode_args is not None and not self._finished():
            from lightning_diffusion.encode import encode

            encode(out=self.path, **self._encode_args)

    def setup(self, stage: str) -> None:
        if self.latent_space is not None:
            return
        self.prepare_data()  # a DataModule used without a Trainer encodes here
        shards = LatentShards(self.path)
        stats = read_json(self.path / NORMALIZATION, "LatentDataModule.path")
        # with encode_from, check_resumable made sure the manifest names the encoder built in __init__
        autoencoder = self._encoder if self._encoder is not None else build_autoencoder(
            shards.manifest["autoencoder"], f"'{self.path / MANIFEST}' autoencoder")
        self.latent_space = LatentSpace.from_stats(autoencoder, stats, self.target_std)
        order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(self.seed)).numpy()
        num_val = max(1, round(self.val_fraction * len(shards)))
        if len(shards) - num_val < self.batch_size:
            raise ValueError(f"LatentDataModule.batch_size: {self.batch_size} exceeds the {len(shards) - num_val} "
                             "training latents; give a smaller batch_size.")
        self.train_dataset = LatentDataset(shards, np.sort(order[num_val:]), self.latent_space, self.seed, True)
        self.val_dataset = LatentDataset(shards, np.sort(order[:num_val]), self.latent_space, self.seed, False)
        self._encode_args = self._encoder = None  # held by latent_space now; the source is not needed again
