"""The embedded default data set: 1,797 real 8x8 handwritten digits, no download needed."""

from pathlib import Path

import numpy as np
import torch

from lightning_diffusion.data.base import ImageDataModule

DIGITS_PATH = Path(__file__).resolve().parent / "assets" / "digits.npz"


class DigitsDataModule(ImageDataModule):
    """UCI handwritten digits (CC BY 4.0): 1 channel, 8x8 native, 10 classes, shipped with the package.

    ``image_size=None`` keeps 8x8; 16 or 32 upsamples (bilinear) for networks that need more pixels.
    The asset is rebuilt by ``scripts/make_digits_asset.py``.

    Example::

        dm = DigitsDataModule(batch_size=256, image_size=16)
        images, labels = next(iter(dm.train_dataloader()))  # [256, 1, 16, 16] in [-1, 1], [256]
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        image_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, num_workers, image_size, seed)
        # allow_pickle=False: the asset is plain arrays, and a swapped file must not run code
        with np.load(DIGITS_PATH, allow_pickle=False) as archive:
            images = torch.from_numpy(archive["images"]).unsqueeze(1)
            labels = torch.from_numpy(archive["labels"])
        self._set_data(images, labels, num_classes=10)
