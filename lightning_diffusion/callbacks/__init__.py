"""Lightning callbacks: thin adapters over the pure-torch pieces; they own their checkpoint state."""

from .posthoc_ema import PostHocEMA
from .samples import SampleGrid, save_image_grid

__all__ = ["PostHocEMA", "SampleGrid", "save_image_grid"]
