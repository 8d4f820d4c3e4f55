"""A folder of image files, optionally one subfolder per class."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lightning_diffusion.data.base import ImageDataModule, center_crop_resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def find_images(root: Path) -> list[Path]:
    """All image files under root, recursively, in a stable (sorted) order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_names(root: Path, files: list[Path]) -> list[str]:
    """Sorted class names when every file sits in a first-level subfolder and there are two or more; else []."""
    parents = {f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1}
    files_at_top = any(len(f.relative_to(root).parts) == 1 for f in files)
    # one subfolder is a layout (folder/images/*.png), not a labelling
    return [] if files_at_top or len(parents) < 2 else sorted(parents)


class ImageFolderDataModule(ImageDataModule):
    """Images from a folder (png/jpg/jpeg/bmp/webp, searched recursively), loaded into memory once.

    If every image sits in a first-level subfolder and there are at least two subfolders, the
    sorted subfolder names are the classes; otherwise the data is unlabelled. ``channels`` is 3
    (RGB) or 1 (grey). Images are center-cropped to a square and resized to ``image_size``, which
    is required when the files differ in size.

    Example::

        # my_images/cat/*.png, my_images/dog/*.jpg -> num_classes == 2
        dm = ImageFolderDataModule("my_images", channels=3, image_size=32, batch_size=64)
    """

    def __init__(
        self,
        path: str,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        image_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, num_workers, image_size, seed)
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"ImageFolderDataModule.path: '{path}' is not an existing folder; give a folder of .png/.jpg images."
            )
        if channels not in (1, 3):
            raise ValueError(f"ImageFolderDataModule.channels: got {channels}; give 1 (grey) or 3 (RGB).")
        files = find_images(root)
        if not files:
            raise ValueError(
                f"ImageFolderDataModule.path: '{path}' holds no {'/'.join(IMAGE_SUFFIXES)} files; "
                "give a folder of images."
            )
        classes = class_names(root, files)
        images = self._load_all(files, channels, image_size, path)
        labels = None
        if classes:
            index = {name: i for i, name in enumerate(classes)}
            labels = torch.tensor([index[f.relative_to(root).parts[0]] for f in files])
        self.classes = classes
        self._set_data(images, labels, num_classes=len(classes))

    @staticmethod
    def _load_all(files: list[Path], channels: int, image_size: int | None, path: str) -> Tensor:
        """Decode every file to uint8 [C,H,W], bringing each to image_size first so they stack."""
        loaded = []
        for file in files:
            image = _read_image(file, channels)
            if image_size is not None:
                image = center_crop_resize(image.unsqueeze(0), image_size).squeeze(0)
            loaded.append(image)
        shapes = {tuple(image.shape[-2:]) for image in loaded}
        if len(shapes) > 1:
            raise ValueError(
                f"ImageFolderDataModule.image_size: the images in '{path}' differ in size ({len(shapes)} sizes); "
                "give an image_size to crop and resize them to."
            )
        return torch.stack(loaded)


def _read_image(file: Path, channels: int) -> Tensor:
    """One image file as uint8 [C,H,W] with the requested channels."""
    try:
        with Image.open(file) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"ImageFolderDataModule.path: '{file}' is not a readable image ({error}).") from error
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
