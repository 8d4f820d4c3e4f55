"""In-memory image DataModule base: normalization, square resize, seeded split, loaders."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .resumable import ImagesSeenSampler, ResumableDataLoader


def center_crop_resize(images: Tensor, size: int) -> Tensor:
    """Center-crop [N,C,H,W] images to a square, then resize to size x size (bilinear, antialias).

    uint8 input comes back as uint8 (rounded, as an image saved to PNG would be); float stays float.
    """
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if images.dtype == torch.uint8:
        return resized.round().clamp(0, 255).to(torch.uint8)
    return resized.clamp(-1.0, 1.0)


def _world(trainer: object | None) -> tuple[int, int]:
    """(world size, global rank): the trainer's, else an initialized process group's, else one process."""
    if trainer is not None:
        return trainer.world_size, trainer.global_rank  # type: ignore[attr-defined]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class InMemoryImages(Dataset):
    """Images [N,C,H,W] (uint8 0..255, or float32 in [-1,1]) and int64 labels [N], kept as tensors.

    Items are ``(image float32 [C,H,W] in [-1,1], label int64)``. uint8 storage keeps large sets
    (CIFAR-10: 150 MB instead of 600 MB) small in memory and cheap to pickle for ``ddp_spawn``.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if image.dtype == torch.uint8:
            image = image.float() / 127.5 - 1.0
        return image, self.labels[index]

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Items at ``indices`` as one batch, vectorized (Stable Target Field's reference stream)."""
        images = self.images[indices]
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        return images, self.labels[indices]


class ImageDataModule(L.LightningDataModule):
    """Base for the package's DataModules: holds images in memory and serves ``(images, labels)`` batches.

    Subclasses load their source in ``__init__`` (so errors surface before training and the CLI can
    read ``channels``, ``image_size`` and ``num_classes`` at once) and hand it to ``_set_data``.
    Batches are ``(float32 [B,C,H,W] in [-1,1], int64 [B])``; labels are 0 for unlabelled data.

    Example::

        class Blobs(ImageDataModule):
            def __init__(self, batch_size: int = 64) -> None:
                super().__init__(batch_size=batch_size)
                self._set_data(torch.randint(0, 256, (500, 1, 8, 8), dtype=torch.uint8), labels=None, num_classes=0)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        image_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if batch_size < 1:
            raise ValueError(f"{name}.batch_size: got {batch_size}; give a positive integer.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"{name}.val_fraction: got {val_fraction}; give a fraction strictly between 0 and 1.")
        if num_workers < 0:
            raise ValueError(f"{name}.num_workers: got {num_workers}; give 0 (load in the main process) or more.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"{name}.image_size: got {image_size}; give a positive integer or null to keep the size.")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self._requested_size = image_size
        self._channels = 0
        self._image_size = 0
        self._num_classes = 0
        self.train_dataset = InMemoryImages(torch.empty(0, 0, 0, 0), torch.empty(0, dtype=torch.long))
        self.val_dataset = self.train_dataset
        self._train_loader: tuple[object, ResumableDataLoader] | None = None  # (trainer, its last loader)

    @property
    def channels(self) -> int:
        """Number of image channels."""
        return self._channels

    @property
    def image_size(self) -> int:
        """Side of the square images served, after any resize."""
        return self._image_size

    @property
    def num_classes(self) -> int:
        """Number of classes, 0 for unlabelled data."""
        return self._num_classes

    def _set_data(
        self,
        images: Tensor,
        labels: Tensor | None,
        num_classes: int,
        val_images: Tensor | None = None,
        val_labels: Tensor | None = None,
    ) -> None:
        """Store [N,C,H,W] uint8 or [-1,1] float images; split off val by ``seed`` unless given."""
        name = type(self).__name__
        height, width = images.shape[-2:]
        if self._requested_size is None and height != width:
            raise ValueError(
                f"{name}.image_size: images are {height}x{width}; give a size to crop and resize them to a square."
            )
        size = self._requested_size or height
        train_images = self._prepare(images, size)
        train_labels = self._prepare_labels(labels, images.shape[0])
        if val_images is None:
            order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
            num_val = max(1, round(self.val_fraction * images.shape[0]))
            val_index, train_index = order[:num_val], order[num_val:]
            val_images, val_labels = train_images[val_index], train_labels[val_index]
            train_images, train_labels = train_images[train_index], train_labels[train_index]
        else:
            val_labels = self._prepare_labels(val_labels, val_images.shape[0])
            val_images = self._prepare(val_images, size)
        if train_images.shape[0] < self.batch_size:
            raise ValueError(
                f"{name}.batch_size: {self.batch_size} exceeds the {train_images.shape[0]} training images; "
                "give a smaller batch_size (the train loader drops incomplete batches)."
            )
        self._channels, self._image_size, self._num_classes = images.shape[1], size, num_classes
        self.train_dataset = InMemoryImages(train_images, train_labels)
        self.val_dataset = InMemoryImages(val_images, val_labels)

    @staticmethod
    def _prepare(images: Tensor, size: int) -> Tensor:
        """Keep uint8 as is, make floats float32, crop/resize to ``size``; contiguous for fast indexing."""
        if images.dtype != torch.uint8:
            images = images.float()
        return center_crop_resize(images, size).contiguous()

    @staticmethod
    def _prepare_labels(labels: Tensor | None, count: int) -> Tensor:
        """Labels as int64 [N]; zeros when unlabelled."""
        return torch.zeros(count, dtype=torch.long) if labels is None else labels.long().reshape(count)

    def __getstate__(self) -> dict:
        """Pickle without the trainer: a spawned rank's trainer attaches itself; a finished one may not pickle."""
        state = self.__dict__.copy()
        state["trainer"] = None
        state["_train_loader"] = None
        return state

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled batches, one share per rank, in an order keyed by ``seed`` and the batches already seen.

        Every step gets ``batch_size`` images (incomplete batches are dropped). The position is
        saved in checkpoints, so a resumed run, mid-epoch or not, trains on exactly the batches the
        uninterrupted run would have (:mod:`lightning_diffusion.data.resumable`); a loader made
        again (``reload_dataloaders_every_n_epochs``) continues where the previous one stopped.
        """
        trainer = self.trainer
        world_size, rank = _world(trainer)
        try:
            sampler = ImagesSeenSampler(self.train_dataset, self.batch_size, world_size, rank, self.seed,
                                        epoch_keyed=getattr(self.train_dataset, "epoch_keyed", False))
        except ValueError as error:
            raise ValueError(str(error).replace("ImagesSeenSampler", f"{type(self).__name__}")) from None
        if trainer is not None and self._train_loader is not None and self._train_loader[0] is trainer:
            previous = self._train_loader[1].sampler  # this fit made it before: continue (a new fit starts at 0)
            sampler.move_to(previous.batches_seen, previous.layout())
        loader = ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=getattr(self.train_dataset, "collate", None),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        self._train_loader = (trainer, loader)
        return loader

    def _eval_loader(self) -> DataLoader:
        """In-order batches over the validation split, last batch kept."""
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            collate_fn=getattr(self.val_dataset, "collate", None),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation split, in order."""
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        """The validation split again: these data sets have no third split."""
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        """The validation split, in order."""
        return self._eval_loader()
