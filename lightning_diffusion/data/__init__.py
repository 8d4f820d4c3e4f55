"""LightningDataModules serving ``(images float32 [B,C,H,W] in [-1,1], labels int64 [B])`` batches."""

from lightning_diffusion.data.arrays import ArrayDataModule
from lightning_diffusion.data.base import ImageDataModule, InMemoryImages
from lightning_diffusion.data.cifar import CIFAR10DataModule
from lightning_diffusion.data.embedded import DigitsDataModule
from lightning_diffusion.data.folder import ImageFolderDataModule
from lightning_diffusion.data.latent_data import LatentDataModule
from lightning_diffusion.data.mixture import GaussianMixture
from lightning_diffusion.data.mixture_data import GaussianMixtureDataModule
from lightning_diffusion.data.resumable import ImagesSeenSampler, ResumableDataLoader

__all__ = [
    "ArrayDataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "GaussianMixture",
    "GaussianMixtureDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImagesSeenSampler",
    "InMemoryImages",
    "LatentDataModule",
    "ResumableDataLoader",
]
