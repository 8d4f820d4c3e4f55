"""DataModules on small generated data: shapes, value mapping, splits, classes, resize, bad input."""

import io
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_diffusion.data import (
    ArrayDataModule,
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
)


def all_images(dm) -> torch.Tensor:
    """Every image of both splits as float [-1,1], in split order."""
    return torch.stack([image for split in (dm.train_dataset, dm.val_dataset) for image, _ in split])


def write_png(path: Path, value: int | tuple[int, int, int], size: tuple[int, int] = (10, 10)) -> None:
    """A flat-colour RGB image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = (value,) * 3 if isinstance(value, int) else value
    Image.new("RGB", size, colour).save(path)


# ---- embedded digits -------------------------------------------------------------------------


def test_digits_counts_range_and_batches() -> None:
    dm = DigitsDataModule(batch_size=100)
    assert (dm.channels, dm.image_size, dm.num_classes) == (1, 8, 10)
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    assert len(dm.val_dataset) == 180  # round(0.1 * 1797)
    images = all_images(dm)
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    labels = torch.cat([dm.train_dataset.labels, dm.val_dataset.labels])
    assert sorted(labels.unique().tolist()) == list(range(10))
    train = list(dm.train_dataloader())
    assert len(train) == len(dm.train_dataset) // 100 and all(x.shape == (100, 1, 8, 8) for x, _ in train)
    x, y = train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    val_sizes = [x.shape[0] for x, _ in dm.val_dataloader()]
    assert val_sizes == [100, 80]  # last batch kept


def test_digits_upsampled() -> None:
    dm = DigitsDataModule(image_size=16)
    x, _ = next(iter(dm.train_dataloader()))
    assert dm.image_size == 16 and x.shape == (64, 1, 16, 16)
    assert -1.0 <= x.min().item() < -0.99 and 0.9 < x.max().item() <= 1.0
    # bilinear upsampling keeps each image's mean brightness (within uint8 rounding)
    native = DigitsDataModule()
    assert torch.allclose(all_images(dm).mean((1, 2, 3)), all_images(native).mean((1, 2, 3)), atol=0.02)


def test_split_and_shuffle_are_seeded(tmp_path: Path) -> None:
    # image i is filled with the value i, so the split can be read off the pixels
    np.save(tmp_path / "ids.npy", np.repeat(np.arange(200, dtype=np.uint8), 16).reshape(200, 4, 4))
    ids = lambda split: ((split.images[:, 0, 0, 0]).long()).tolist()  # noqa: E731
    a, b = (ArrayDataModule(str(tmp_path / "ids.npy"), val_fraction=0.25, batch_size=10) for _ in range(2))
    other = ArrayDataModule(str(tmp_path / "ids.npy"), val_fraction=0.25, batch_size=10, seed=1)
    assert ids(a.val_dataset) == ids(b.val_dataset) != ids(other.val_dataset)
    assert len(ids(a.val_dataset)) == 50
    assert sorted(ids(a.train_dataset) + ids(a.val_dataset)) == list(range(200))
    first = [next(iter(dm.train_dataloader()))[0][:, 0, 0, 0] for dm in (a, b)]
    assert torch.equal(first[0], first[1])
    epochs = [torch.cat([x[:, 0, 0, 0] for x, _ in loader]) for loader in [a.train_dataloader()] * 2]
    assert not torch.equal(epochs[0], epochs[1])  # the generator advances: each epoch has a new order


def test_batch_larger_than_train_set_is_refused() -> None:
    with pytest.raises(ValueError, match=r"DigitsDataModule\.batch_size: 5000 exceeds the 1617"):
        DigitsDataModule(batch_size=5000)
    with pytest.raises(ValueError, match=r"DigitsDataModule\.val_fraction"):
        DigitsDataModule(val_fraction=1.0)


def test_datamodule_pickles_for_ddp_spawn() -> None:
    dm = DigitsDataModule(batch_size=32, image_size=16)
    # A finished fit leaves its trainer attached; it must not travel (this one cannot be pickled).
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, unpicklable=lambda: None)
    copy = pickle.loads(pickle.dumps(dm))
    assert copy.trainer is None and dm.trainer is not None
    assert (copy.channels, copy.image_size, copy.num_classes) == (1, 16, 10)
    assert torch.equal(next(iter(copy.train_dataloader()))[0], next(iter(dm.train_dataloader()))[0])


# ---- image folders ---------------------------------------------------------------------------


def test_folder_unlabelled_recursive(tmp_path: Path) -> None:
    for i, suffix in enumerate([".png", ".jpg", ".bmp", ".webp", ".png", ".PNG"] * 2):
        write_png(tmp_path / ("deep/er" if i % 2 else "") / f"img{i}{suffix}", 255 if i % 3 else 0)
    (tmp_path / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(str(tmp_path), batch_size=4, val_fraction=0.25)
    assert (dm.channels, dm.image_size, dm.num_classes) == (3, 10, 0)
    assert len(dm.train_dataset) + len(dm.val_dataset) == 12
    images = all_images(dm)
    # 0 -> -1 and 255 -> +1, exactly for PNG/BMP, within JPEG/WebP loss for the others
    assert torch.allclose(images.amin((1, 2, 3)).sort().values[:4], torch.full((4,), -1.0), atol=0.05)
    assert images.max().item() == 1.0 and images.min().item() == -1.0
    _, labels = next(iter(dm.train_dataloader()))
    assert labels.tolist() == [0, 0, 0, 0]


def test_folder_class_subfolders(tmp_path: Path) -> None:
    for i in range(5):
        write_png(tmp_path / "dog" / f"{i}.png", (0, 0, 255))
        write_png(tmp_path / "cat" / f"{i}.png", (255, 0, 0))
    dm = ImageFolderDataModule(str(tmp_path), batch_size=2, val_fraction=0.2)
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    for image, label in [*dm.train_dataset, *dm.val_dataset]:
        red, blue = image[0].mean().item(), image[2].mean().item()
        assert (red, blue) == ((1.0, -1.0) if label == 0 else (-1.0, 1.0))


def test_folder_resize_and_grey(tmp_path: Path) -> None:
    write_png(tmp_path / "wide.png", 255, size=(20, 10))
    write_png(tmp_path / "tall.png", 0, size=(6, 12))
    write_png(tmp_path / "square.png", 128, size=(8, 8))
    with pytest.raises(ValueError, match=r"ImageFolderDataModule\.image_size: .* differ in size"):
        ImageFolderDataModule(str(tmp_path), batch_size=1)
    dm = ImageFolderDataModule(str(tmp_path), channels=1, image_size=4, batch_size=1, val_fraction=0.34)
    assert (dm.channels, dm.image_size) == (1, 4)
    values = sorted(round(image.mean().item(), 3) for image in all_images(dm))
    assert values == [-1.0, round(128 / 127.5 - 1, 3), 1.0]
    assert all_images(dm).shape == (3, 1, 4, 4)


def test_folder_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageFolderDataModule\.path: '.*missing' is not an existing folder"):
        ImageFolderDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"ImageFolderDataModule\.path: .* holds no"):
        ImageFolderDataModule(str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"ImageFolderDataModule\.path: .*broken\.png' is not a readable image"):
        ImageFolderDataModule(str(tmp_path))
    with pytest.raises(ValueError, match=r"ImageFolderDataModule\.channels"):
        ImageFolderDataModule(str(tmp_path), channels=4)


# ---- arrays ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "channels_last", "channels"),
    [((30, 6, 6, 3), None, 3), ((30, 3, 6, 6), None, 3), ((30, 6, 6), None, 1), ((30, 4, 6, 6), False, 4)],
)
def test_arrays_layouts(tmp_path: Path, shape: tuple, channels_last: bool | None, channels: int) -> None:
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(30) % 7)
    dm = ArrayDataModule(str(tmp_path / "a.npz"), channels_last=channels_last, batch_size=8)
    assert (dm.channels, dm.image_size, dm.num_classes) == (channels, 6, 7)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (3, channels, 6, 6) and y.max().item() < 7
    # the layout was read correctly iff each stored image maps back to its source array
    source = images.reshape(30, 6, 6, 3).transpose(0, 3, 1, 2) if shape[-1] == 3 else images.reshape(30, channels, 6, 6)
    first = dm.val_dataset.images[0].numpy()
    assert any(np.array_equal(first, s) for s in source)


def test_arrays_float_ranges_and_npy(tmp_path: Path) -> None:
    unit = np.linspace(0, 1, 20 * 16, dtype=np.float64).reshape(20, 4, 4)
    np.save(tmp_path / "unit.npy", unit)
    np.savez(tmp_path / "signed.npz", pics=unit * 2 - 1)
    from_unit = ArrayDataModule(str(tmp_path / "unit.npy"), batch_size=4)
    from_signed = ArrayDataModule(str(tmp_path / "signed.npz"), images_key="pics", labels_key=None, batch_size=4)
    for dm in (from_unit, from_signed):
        assert dm.num_classes == 0 and dm.train_dataset.images.dtype == torch.float32
        images = all_images(dm)
        assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert torch.allclose(all_images(from_unit), all_images(from_signed), atol=1e-6)


def test_arrays_image_size_resizes(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", images=np.full((20, 12, 12), 255, np.uint8), labels=np.zeros(20, np.int64))
    dm = ArrayDataModule(str(tmp_path / "a.npz"), image_size=6, batch_size=4)
    x, _ = next(iter(dm.train_dataloader()))
    assert dm.image_size == 6 and x.shape == (4, 1, 6, 6) and torch.all(x == 1.0)


def test_arrays_bad_input(tmp_path: Path) -> None:
    good = np.zeros((10, 4, 4), np.uint8)
    cases = {
        "missing.npz": (None, FileNotFoundError, r"ArrayDataModule\.path: .* does not exist"),
        "no_images.npz": ({"pixels": good}, ValueError, r"ArrayDataModule\.images_key: 'images' is not in"),
        "no_labels.npz": ({"images": good}, ValueError, r"ArrayDataModule\.labels_key: 'labels' is not in"),
        "five_d.npz": ({"images": good[:, None, None], "labels": np.zeros(10, int)}, ValueError, r"shape \(10, 1, 1"),
        "axis.npz": (
            {"images": np.zeros((10, 5, 5, 5), np.uint8), "labels": np.zeros(10, int)},
            ValueError,
            r"cannot tell the channel axis .* set channels_last",
        ),
        "ints.npz": ({"images": good.astype(np.int32), "labels": np.zeros(10, int)}, ValueError, r"dtype int32"),
        "range.npz": ({"images": good + 3.0, "labels": np.zeros(10, int)}, ValueError, r"span \[3, 3\]"),
        "labels.npz": ({"images": good, "labels": np.zeros(9, int)}, ValueError, r"labels_key: labels have .* \(9,\)"),
        "objects.npz": (
            {"images": np.array([good, None], dtype=object), "labels": np.zeros(2, int)},
            ValueError,
            r"ArrayDataModule\.path: .* non-numeric",
        ),
    }
    for name, (content, error, message) in cases.items():
        if content is not None:
            np.savez(tmp_path / name, **content)
        with pytest.raises(error, match=message):
            ArrayDataModule(str(tmp_path / name), batch_size=2)


# ---- CIFAR-10 ------------------------------------------------------------------------------------


class Py2StylePickler(pickle._Pickler):
    """Writes str and bytes as Python 2 str opcodes (SHORT_BINSTRING/BINSTRING), as the real archive's cPickle did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def dump_like_archive(batch: dict, file: Path, style: str) -> None:
    """Pickle a batch as the real archive (Python 2, numpy 1 names) or as Python 3 re-pickles would."""
    buffer = io.BytesIO()
    if style == "python2":
        Py2StylePickler(buffer, protocol=2).dump({key.decode(): value for key, value in batch.items()})
        data = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    else:
        pickle.dump(batch, buffer, protocol=int(style[-1]))
        data = buffer.getvalue()
    file.write_bytes(data)


def write_fake_cifar(root: Path, per_batch: int = 20) -> Path:
    """A cifar-10-batches-py folder: str keys read back as bytes, uint8 data [N,3072], list labels.

    Most files are written the way the real archive was (Python 2 str opcodes, numpy.core names);
    two are Python 3 re-pickles (protocol 2 with _codecs.encode for bytes, and protocol 4).
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    planes = np.concatenate([np.full(1024, 255), np.zeros(1024), np.full(1024, 128)]).astype(np.uint8)
    styles = ["python2", "protocol2", "protocol4", "python2", "python2", "python2"]
    for style, name in zip(styles, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], strict=True):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % 10 for i in range(per_batch)],
            b"data": np.tile(planes, (per_batch, 1)),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        dump_like_archive(batch, folder / name, style)
    return folder


def test_cifar_reads_archive_folder(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)
    for path in (folder, tmp_path):  # the folder itself or its parent
        dm = CIFAR10DataModule(str(path), batch_size=16)
        assert (dm.channels, dm.image_size, dm.num_classes) == (3, 32, 10)
        assert (len(dm.train_dataset), len(dm.val_dataset)) == (100, 20)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.tolist() == [i % 10 for i in range(16)]
    # planes are R, G, B in order: 255 -> 1, 0 -> -1, 128 -> 0.0039
    assert torch.allclose(x[0].mean((1, 2)), torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
    assert CIFAR10DataModule(str(folder), image_size=8, batch_size=16).image_size == 8


class _RemoveFile:
    """Pickles to a call of os.remove: what a crafted batch file could do if unpickled naively."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.remove, (self.target,)


def test_cifar_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CIFAR10DataModule\.path: .* does not exist"):
        CIFAR10DataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"CIFAR10DataModule\.path: .* lacks data_batch_1\.\.5 and test_batch"):
        CIFAR10DataModule(str(tmp_path))
    folder = write_fake_cifar(tmp_path)
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("must survive")
    with (folder / "data_batch_3").open("wb") as handle:
        pickle.dump({b"data": _RemoveFile(str(sentinel)), b"labels": []}, handle, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3' is not a CIFAR-10 python batch \(refused .*posix\.remove"):
        CIFAR10DataModule(str(folder))
    assert sentinel.exists()
    with (folder / "data_batch_3").open("wb") as handle:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, handle, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3' lacks b'data' as uint8 \[N, 3072\]"):
        CIFAR10DataModule(str(folder))
