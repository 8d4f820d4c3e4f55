"""Lightning callbacks: thin adapters over the pure-torch pieces; they own their checkpoint state."""

from .samples import SampleGrid, save_image_grid

__all__ = ["SampleGrid", "save_image_grid"]
