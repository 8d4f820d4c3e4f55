"""CIFAR-10 from the standard python archive folder ``cifar-10-batches-py``, read without running pickled code."""

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_diffusion.data.base import ImageDataModule

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_FILE = "test_batch"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

# The archive pickles ndarrays through these names (numpy 1 and numpy 2 spellings of the module);
# Python 3 re-pickles at protocol 2 add _codecs.encode for bytes. All are side-effect free, and
# nothing else is ever needed, so nothing else may be imported.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build NumPy arrays and plain containers, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the NumPy reconstruction helpers; anything else is a refused, possibly crafted file."""
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global '{module}.{name}'")
        if name == "_reconstruct":
            return _reconstruct
        if name == "encode":
            return codecs.encode
        return getattr(np, name)


def read_batch(file: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR batch file as uint8 images [N,3,32,32] and int64 labels [N]."""
    try:
        with file.open("rb") as handle:
            batch = ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"CIFAR10DataModule.path: '{file}' is not a CIFAR-10 python batch ({error}).") from error
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"CIFAR10DataModule.path: '{file}' lacks b'data' as uint8 [N, 3072]; give the original archive."
        )
    labels = np.asarray(labels if isinstance(labels, (list, np.ndarray)) else [], dtype=np.int64)
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"CIFAR10DataModule.path: '{file}' lacks b'labels' as {data.shape[0]} class ids in 0..9.")
    # rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def find_archive_folder(path: str) -> Path:
    """The folder holding the batch files: ``path`` itself or its ``cifar-10-batches-py`` subfolder."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR10DataModule.path: '{path}' does not exist; give the extracted cifar-10-batches-py folder."
        )
    for folder in (root, root / "cifar-10-batches-py"):
        if all((folder / name).is_file() for name in (*TRAIN_FILES, VAL_FILE)):
            return folder
    raise ValueError(
        f"CIFAR10DataModule.path: '{path}' lacks data_batch_1..5 and test_batch; "
        f"give the folder extracted from {ARCHIVE_URL}."
    )


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (3x32x32, 10 classes): ``data_batch_1..5`` train, ``test_batch`` validates (and tests).

    ``path`` is the extracted ``cifar-10-batches-py`` folder or its parent. The pickled batches
    are read with an unpickler that can only build NumPy arrays, so a crafted file is refused
    instead of running code. Nothing is downloaded.

    Example::

        # tar xzf cifar-10-python.tar.gz -C data/
        dm = CIFAR10DataModule("data/cifar-10-batches-py", batch_size=128)
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, seed=seed)
        folder = find_archive_folder(path)
        train = [read_batch(folder / name) for name in TRAIN_FILES]
        val_images, val_labels = read_batch(folder / VAL_FILE)
        images = torch.cat([images for images, _ in train])
        labels = torch.cat([labels for _, labels in train])
        self._set_data(images, labels, num_classes=10, val_images=val_images, val_labels=val_labels)
