"""Images read a slice at a time, for encoding data sets larger than memory (``lightning-diffusion encode``).

A source is opened from one string: ``digits`` (the embedded set), a ``.npy`` file (memory-mapped),
a ``.npz`` archive, an extracted CIFAR-10 ``cifar-10-batches-py`` folder (its 50,000 training
images), or a folder of image files (one subfolder per class, as :class:`ImageFolderDataModule`
reads them; files are decoded only when their slice is read). Every source yields float32
``[n, C, S, S]`` in [-1, 1], center-cropped and resized to ``image_size`` when one is given.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_diffusion.data.arrays import to_image_tensor, to_labels, to_nchw
from lightning_diffusion.data.base import center_crop_resize
from lightning_diffusion.data.cifar import TRAIN_FILES, find_archive_folder, read_batch
from lightning_diffusion.data.embedded import DIGITS_PATH
from lightning_diffusion.data.folder import _read_image, class_names, find_images

__all__ = ["ImageSource", "open_source"]


class ImageSource:
    """``len(source)`` images of ``image_shape`` with labels (``num_classes`` 0: unlabelled, all 0).

    Subclasses implement :meth:`_read` (raw uint8 or [-1, 1] float) and set the attributes; the
    base brings every slice to float32 [-1, 1] at ``image_size``.
    """

    count: int
    num_classes: int
    native_shape: tuple[int, int, int]
    labels: Tensor  # int64 [count], in memory (8 bytes an image)

    def __init__(self, description: dict[str, Any], image_size: int | None, setting: str) -> None:
        self.description = description
        self.image_size = image_size
        self.setting = setting

    def __len__(self) -> int:
        return self.count

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images served."""
        channels, height, width = self.native_shape
        if self.image_size is not None:
            return channels, self.image_size, self.image_size
        if height != width:
            raise ValueError(f"{self.setting}: the images are {height}x{width}; give an image size to crop and "
                             "resize them to a square.")
        return channels, height, width

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Images ``[start, stop)`` as float32 [-1, 1] at ``image_shape``, and their int64 labels."""
        images, labels = self._read(start, stop)
        size = self.image_shape[-1]
        images = center_crop_resize(images, size)
        images = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        return images.contiguous(), labels.long()

    def _read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What was encoded (stored in the shard manifest; a resumed encode must match it)."""
        return {**self.description, "count": self.count, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes}


class TensorSource(ImageSource):
    """Images already in memory: the digits, CIFAR-10, an ``.npz`` archive."""

    def __init__(self, images: Tensor, labels: Tensor | None, num_classes: int, description: dict[str, Any],
                 image_size: int | None, setting: str) -> None:
        super().__init__(description, image_size, setting)
        self.images = images
        self.labels = torch.zeros(images.shape[0], dtype=torch.long) if labels is None else labels.long()
        self.count, self.num_classes, self.native_shape = images.shape[0], num_classes, tuple(images.shape[1:])

    def _read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return self.images[start:stop], self.labels[start:stop]


class NpyFileSource(ImageSource):
    """A ``.npy`` array memory-mapped: slices are read from disk as they are encoded."""

    def __init__(self, file: Path, channels_last: bool | None, image_size: int | None, setting: str) -> None:
        super().__init__({"kind": "npy", "path": str(file.resolve())}, image_size, setting)
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{setting}: '{file}' is not a plain NumPy array file ({error}).") from error
        self.array = to_nchw(array, channels_last, setting)
        self.count, self.num_classes, self.native_shape = self.array.shape[0], 0, tuple(self.array.shape[1:])
        self.labels = torch.zeros(self.count, dtype=torch.long)

    def _read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        images = to_image_tensor(np.ascontiguousarray(self.array[start:stop]), self.setting)
        return images, self.labels[start:stop]


class FolderSource(ImageSource):
    """Image files, decoded a slice at a time (ImageNet does not fit in memory; its file list does)."""

    def __init__(self, root: Path, channels: int, image_size: int | None, setting: str) -> None:
        super().__init__({"kind": "folder", "path": str(root.resolve()), "channels": channels}, image_size, setting)
        self.files = find_images(root)
        if not self.files:
            raise ValueError(f"{setting}: '{root}' holds no image files; give a folder of .png/.jpg images.")
        classes = class_names(root, self.files)
        index = {name: i for i, name in enumerate(classes)}
        self.labels = torch.tensor([index[f.relative_to(root).parts[0]] if classes else 0 for f in self.files])
        self.channels = channels
        first = _read_image(self.files[0], channels)
        self.count, self.num_classes, self.native_shape = len(self.files), len(classes), tuple(first.shape)

    def _read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        size = self.image_shape[-1]
        images = []
        for file in self.files[start:stop]:
            image = center_crop_resize(_read_image(file, self.channels).unsqueeze(0), size)
            images.append(image)
        return torch.cat(images), self.labels[start:stop]


def open_source(spec: str, channels: int = 3, image_size: int | None = None, channels_last: bool | None = None,
                setting: str = "source") -> ImageSource:
    """The source ``spec`` names: ``digits``, a ``.npy``/``.npz`` file, a CIFAR-10 folder or an image folder."""
    if spec == "digits":
        with np.load(DIGITS_PATH, allow_pickle=False) as archive:
            images = torch.from_numpy(archive["images"]).unsqueeze(1)
            labels = torch.from_numpy(archive["labels"])
        return TensorSource(images, labels, 10, {"kind": "digits"}, image_size, setting)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".npy":
        return NpyFileSource(path, channels_last, image_size, setting)
    if path.is_file() and path.suffix == ".npz":
        images, labels = _read_npz(path, setting)
        images = to_image_tensor(to_nchw(images, channels_last, setting), setting)
        labels_t = None if labels is None else to_labels(labels, images.shape[0], setting)
        num_classes = 0 if labels_t is None else int(labels_t.max()) + 1
        return TensorSource(images, labels_t, num_classes, {"kind": "npz", "path": str(path.resolve())},
                            image_size, setting)
    if path.is_dir():
        try:
            folder = find_archive_folder(spec)
        except ValueError:
            return FolderSource(path, channels, image_size, setting)
        batches = [read_batch(folder / name) for name in TRAIN_FILES]
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        return TensorSource(images, labels, 10, {"kind": "cifar10", "path": str(folder.resolve())}, image_size,
                            setting)
    raise ValueError(f"{setting}: '{spec}' is neither 'digits', an existing .npy/.npz file, nor a folder of images "
                     "or CIFAR-10 batches.")


def _read_npz(path: Path, setting: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` and optional ``labels`` of an archive, never unpickling (a crafted file cannot run code)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise ValueError(f"{setting}: '{path}' has no 'images' array (keys {sorted(archive.files)}).")
            return archive["images"], archive["labels"] if "labels" in archive.files else None
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{setting}: '{path}' is not a NumPy .npz archive ({error}).") from error
