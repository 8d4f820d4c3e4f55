"""Images stored as a NumPy array: a .npy file (images only) or a .npz archive (images and labels)."""

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_diffusion.data.base import ImageDataModule

CHANNEL_COUNTS = (1, 3, 4)


def to_nchw(array: np.ndarray, channels_last: bool | None, name: str) -> np.ndarray:
    """Bring [N,H,W], [N,H,W,C] or [N,C,H,W] to [N,C,H,W]; guess the layout when channels_last is None."""
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{name}: images have shape {array.shape}; give [N,H,W], [N,H,W,C] or [N,C,H,W].")
    if channels_last is None:
        last_is_channel = array.shape[3] in CHANNEL_COUNTS and array.shape[1] not in CHANNEL_COUNTS
        if not last_is_channel and array.shape[1] not in CHANNEL_COUNTS:
            raise ValueError(
                f"{name}: cannot tell the channel axis of shape {array.shape}; set channels_last to true or false."
            )
        channels_last = last_is_channel
    return array.transpose(0, 3, 1, 2) if channels_last else array


def to_image_tensor(array: np.ndarray, name: str) -> Tensor:
    """uint8 stays uint8 (0..255); floats in [0,1] or [-1,1] become float32 in [-1,1]."""
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: images have dtype {array.dtype}; give uint8 (0..255) or float ([0,1] or [-1,1]).")
    images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    low, high = images.min().item(), images.max().item()
    # a little slack for values that were rounded or resized before saving
    if low < -1.01 or high > 1.01:
        raise ValueError(f"{name}: float images span [{low:.3g}, {high:.3g}]; give values in [0,1] or [-1,1].")
    images = images.clamp(-1.0, 1.0)
    return images if low < 0 else images * 2.0 - 1.0


def to_labels(array: np.ndarray, count: int, name: str) -> Tensor:
    """Non-negative integer class ids [N]."""
    if not np.issubdtype(array.dtype, np.integer) or array.shape != (count,) or (count and array.min() < 0):
        raise ValueError(
            f"{name}: labels have dtype {array.dtype} and shape {array.shape}; give {count} non-negative integers."
        )
    return torch.from_numpy(array.astype(np.int64))


class ArrayDataModule(ImageDataModule):
    """Images from ``.npy`` (images only) or ``.npz`` (``images_key``, optional ``labels_key``).

    uint8 arrays are read as 0..255; float arrays as [-1,1] if any value is negative, else [0,1].
    Layouts [N,H,W] (grey), [N,H,W,C] and [N,C,H,W] are accepted: with ``channels_last=None`` the
    last axis is the channel axis when its size is 1, 3 or 4 and axis 1's is not. Set
    ``labels_key: null`` for an unlabelled ``.npz``; ``num_classes`` is the largest label + 1.

    Example::

        np.savez("digits.npz", images=uint8_images_nhwc, labels=int_labels)
        dm = ArrayDataModule("digits.npz", image_size=32)
    """

    def __init__(
        self,
        path: str,
        images_key: str = "images",
        labels_key: str | None = "labels",
        channels_last: bool | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        image_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, num_workers, image_size, seed)
        images_array, labels_array = _read_arrays(Path(path).expanduser(), path, images_key, labels_key)
        images = to_image_tensor(to_nchw(images_array, channels_last, "ArrayDataModule.path"), "ArrayDataModule.path")
        if images.shape[0] < 2:
            raise ValueError(f"ArrayDataModule.path: '{path}' holds {images.shape[0]} image(s); give at least 2.")
        labels = None
        if labels_array is not None:
            labels = to_labels(labels_array, images.shape[0], "ArrayDataModule.labels_key")
        num_classes = 0 if labels is None else int(labels.max()) + 1
        self._set_data(images, labels, num_classes=num_classes)


def _read_arrays(
    file: Path, path: str, images_key: str, labels_key: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images and optional labels from .npy/.npz, never unpickling objects (a crafted file cannot run code)."""
    if not file.is_file():
        raise FileNotFoundError(f"ArrayDataModule.path: '{path}' does not exist; give a .npy or .npz file of images.")
    if file.suffix not in (".npy", ".npz"):
        raise ValueError(f"ArrayDataModule.path: '{path}' is neither .npy nor .npz; give a NumPy array file.")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"ArrayDataModule.path: '{path}' is not a plain NumPy array file ({error}).") from error
    if isinstance(loaded, np.ndarray):
        return loaded, None
    with loaded:
        keys = sorted(loaded.files)
        if images_key not in keys:
            raise ValueError(f"ArrayDataModule.images_key: '{images_key}' is not in '{path}'; its keys are {keys}.")
        if labels_key is not None and labels_key not in keys:
            raise ValueError(
                f"ArrayDataModule.labels_key: '{labels_key}' is not in '{path}' (keys {keys}); "
                "give one of them, or null for unlabelled images."
            )
        try:
            return loaded[images_key], None if labels_key is None else loaded[labels_key]
        except ValueError as error:  # object arrays, refused because they would need unpickling
            raise ValueError(f"ArrayDataModule.path: '{path}' holds a non-numeric array ({error}).") from error
