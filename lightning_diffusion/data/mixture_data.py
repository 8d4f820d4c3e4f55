"""A DataModule drawing its images from a :class:`~.mixture.GaussianMixture` (docs/algorithms.md 7)."""

from __future__ import annotations

import torch

from .base import ImageDataModule
from .mixture import GaussianMixture


class GaussianMixtureDataModule(ImageDataModule):
    """Images sampled from a Gaussian mixture whose optimal denoiser is known (default: the digits mixture).

    ``train_size`` training and ``val_size`` validation images are drawn once, from ``seed``, and
    served like any other DataModule's (same resumable, layout-independent order). The default
    65,536 images are more than a 1,000-step run of batch 64 sees, so every step gets fresh
    samples of the true distribution. Samples are not clamped to [-1, 1]: the mixture is the data.
    ``mixture`` is the object that :class:`~lightning_diffusion.callbacks.GaussianMixtureMetrics`
    scores models against.

    Example::

        dm = GaussianMixtureDataModule(batch_size=64)        # 8x8 digits-like images, 10 classes
        dm.mixture.posterior_mean(x_t, a, s, labels)          # E[x0 | x_t, class]
    """

    def __init__(
        self,
        batch_size: int = 64,
        train_size: int = 65536,
        val_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        path: str | None = None,
    ) -> None:
        name = type(self).__name__
        for setting, value in (("train_size", train_size), ("val_size", val_size)):
            if value < 1:
                raise ValueError(f"{name}.{setting}: got {value}; give a positive number of images.")
        # val_fraction is unused (the validation images are drawn apart); image_size None: the mixture's 8x8
        super().__init__(batch_size, 0.5, num_workers, None, seed)
        self.mixture = GaussianMixture.digits() if path is None else GaussianMixture.load(path)
        generator = torch.Generator().manual_seed(seed)
        images, labels = self.mixture.sample(train_size, generator)
        val_images, val_labels = self.mixture.sample(val_size, generator)
        self._set_data(images, labels, self.mixture.num_classes, val_images, val_labels)
