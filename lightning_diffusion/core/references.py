"""Where Stable Target Field references come from (docs/algorithms.md 2, reference set choices).

Every source returns the minibatch first (sample i's own image at index i, or at ``own_index``)
followed by extra images. Sample i's own clean image must count exactly once: other copies of it
(a batch duplicate, a queued or fresh draw of the same item) are found by :func:`own_duplicates`
and dropped for sample i only. Pure torch: the run is reached by duck typing
(``module.trainer.datamodule``, ``torch.distributed``), never by importing Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

__all__ = ["ReferenceSet", "ReferenceSource", "FreshReferences", "GatheredReferences", "QueueReferences",
           "BatchReferences", "make_reference_source", "duplicate_mask", "own_duplicates"]

_NUM_PROJECTIONS = 4  # all 4 random projections must agree: accidental matches ~ (1e-5)^4 per pair


@dataclass
class ReferenceSet:
    images: Tensor  # [n, C, H, W], the minibatch first
    labels: Tensor | None  # [n] or None
    own_index: Tensor | None  # [B]; None means arange(B)
    exclude: Tensor | None  # [n] bool, references to drop for every sample (never a sample's own)


_PROJECTIONS: dict[tuple[int, str], Tensor] = {}


def _fingerprint(images: Tensor) -> Tensor:
    flat = images.reshape(images.shape[0], -1).float()
    key = (flat.shape[1], str(flat.device))
    if key not in _PROJECTIONS:  # fixed seed: every rank and every step uses the same projections
        proj = torch.randn(flat.shape[1], _NUM_PROJECTIONS, generator=torch.Generator().manual_seed(20231))
        _PROJECTIONS[key] = (proj / proj.norm(dim=0)).to(flat.device)
    return flat @ _PROJECTIONS[key]


def _same_images(prints_a: Tensor, prints_b: Tensor, d: int) -> Tensor:
    """[A, B] bool: fingerprints equal within 1e-5 * sqrt(d) on every projection (identical images).

    One projection at a time: [A, B] comparisons, never an [A, B, projections] tensor.
    """
    tol = 1e-5 * d**0.5
    match = torch.ones(prints_a.shape[0], prints_b.shape[0], dtype=torch.bool, device=prints_a.device)
    for k in range(_NUM_PROJECTIONS):
        match &= (prints_a[:, k, None] - prints_b[None, :, k]).abs() <= tol
    return match


def duplicate_mask(batch: Tensor, references: Tensor, own: Tensor | None = None) -> Tensor:
    """[n] bool: references identical to some batch image (by 4 random projections), own entries excluded.

    Set semantics, for every sample at once; :class:`~.targets.StableTargetField` uses the
    per-sample rule of :func:`own_duplicates` instead (only a sample's own image must be unique).

    Vectorized, no host sync. Identical images give projections equal up to fp32 rounding
    (tolerance 1e-5 * sqrt(d)); distinct ones collide with negligible probability.
    """
    dup = _same_images(_fingerprint(batch), _fingerprint(references), batch[0].numel()).any(0)
    own = torch.arange(batch.shape[0], device=batch.device) if own is None else own
    dup[own] = False
    return dup


def own_duplicates(references: Tensor, own_index: Tensor | None, batch: int | None = None) -> Tensor:
    """[B, n] bool: reference j is a copy of sample i's own image ``references[own_index[i]]``, j not own.

    Same 4 random projections and tolerance as :func:`duplicate_mask`: one [n, d] x [d, 4] matmul
    and [B, n] comparisons, never a [B, n, d] tensor. ``own_index=None`` means ``arange(batch)``
    (the batch first; without ``batch``, every reference is some sample's own image).
    """
    n = references.shape[0]
    own = torch.arange(n if batch is None else batch, device=references.device) if own_index is None else own_index
    prints = _fingerprint(references)
    match = _same_images(prints[own], prints, references[0].numel())
    match[torch.arange(own.shape[0], device=own.device), own] = False
    return match


def _seed(*parts: int) -> int:
    # Distinct 63-bit seeds per tuple via a multiplicative hash (same scheme as the module's streams).
    mixed = 0
    for k, p in zip((0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB), parts):
        mixed += p * k
    return mixed % (2**63 - 1)


class ReferenceSource:
    """Protocol: ``setup(module)``, ``references(x0, labels) -> ReferenceSet``, ``after_step``, state."""

    def __init__(self, reference_size: int, seed: int = 0) -> None:
        self.reference_size, self.seed = reference_size, seed

    def setup(self, module: Any) -> None:
        batch = getattr(getattr(getattr(module, "trainer", None), "datamodule", None), "batch_size", None)
        if isinstance(batch, int):
            self.check_batch(batch)

    sized = True  # False for sources whose size is set by the batch (reference_size is not used)

    def check_batch(self, batch: int) -> None:
        if self.sized and self.reference_size < batch:
            raise ValueError(
                f"StableTargetField.reference_size={self.reference_size} must be >= the per-device batch size "
                f"{batch} (the references are the minibatch plus extra images)."
            )

    def references(self, x0: Tensor, labels: Tensor | None) -> ReferenceSet:
        raise NotImplementedError

    def after_step(self, x0: Tensor, labels: Tensor | None) -> None:
        """Called after the targets of a micro-batch are computed (the queue pushes it here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BatchReferences(ReferenceSource):
    """The minibatch only (n = B): the cheapest, highest-variance STF."""

    sized = False

    def references(self, x0: Tensor, labels: Tensor | None) -> ReferenceSet:
        return ReferenceSet(x0, labels, None, None)


class _KeyedBatches(Sampler):
    """Endless index batches; batch k is drawn from a generator keyed by (seed, rank, k): resumable."""

    def __init__(self, size: int, count: int, seed: int, rank: int, start: int) -> None:
        self.size, self.count, self.seed, self.rank, self.start = size, count, seed, rank, start

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            gen = torch.Generator().manual_seed(_seed(self.seed, self.rank, k))
            yield torch.randint(self.size, (self.count,), generator=gen).tolist()
            k += 1


class FreshReferences(ReferenceSource):
    """``reference_size - B`` fresh training images per micro-batch (the paper's setting).

    In-memory datasets with ``get_batch(indices)`` are indexed directly; others are read through a
    DataLoader with the DataModule's workers. Draw k uses a generator keyed by (seed, rank, k), and
    k is checkpointed, so a resume continues the same reference stream on every rank.
    """

    def __init__(self, reference_size: int, seed: int = 0) -> None:
        super().__init__(reference_size, seed)
        self.consumed = 0
        self._dataset: Any = None
        self._iterator: Iterator | None = None
        self._rank = 0
        self._workers = 0

    def setup(self, module: Any) -> None:
        super().setup(module)
        datamodule = getattr(module.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None)
        if dataset is None:
            raise ValueError(
                "StableTargetField(source='fresh') needs a DataModule with a `train_dataset`; "
                "use source='queue' or source='gather' with other data sources."
            )
        self._dataset, self._rank = dataset, int(module.global_rank)
        self._workers = int(getattr(datamodule, "num_workers", 0) or 0)
        self._iterator = None

    def _extras(self, count: int) -> tuple[Tensor, Tensor]:
        if hasattr(self._dataset, "get_batch"):
            gen = torch.Generator().manual_seed(_seed(self.seed, self._rank, self.consumed))
            return self._dataset.get_batch(torch.randint(len(self._dataset), (count,), generator=gen))
        if self._iterator is None:
            sampler = _KeyedBatches(len(self._dataset), count, self.seed, self._rank, self.consumed)
            loader = DataLoader(self._dataset, batch_sampler=sampler, num_workers=self._workers, pin_memory=True)
            self._iterator = iter(loader)
        batch = next(self._iterator)
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else torch.zeros(count, dtype=torch.long)
        return images, labels

    def references(self, x0: Tensor, labels: Tensor | None) -> ReferenceSet:
        if self._dataset is None:
            raise RuntimeError("StableTargetField(source='fresh') was used before setup(module) attached it to a run.")
        self.check_batch(x0.shape[0])
        count = self.reference_size - x0.shape[0]
        if count == 0:
            return ReferenceSet(x0, labels, None, None)
        images, ref_labels = self._extras(count)
        self.consumed += 1
        images = images.to(x0.device, x0.dtype, non_blocking=True)
        refs = torch.cat([x0, images])
        all_labels = None
        if labels is not None:
            all_labels = torch.cat([labels, ref_labels.to(labels.device, non_blocking=True)])
        return ReferenceSet(refs, all_labels, None, None)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state.get("consumed", 0))
        self._iterator = None


class GatheredReferences(ReferenceSource):
    """The minibatches of every DDP rank (``world_size * B`` references; no extra loading).

    Needs equal per-rank batch sizes (the library's loaders drop incomplete batches). Outside
    DDP it is the minibatch alone.
    """

    sized = False

    def references(self, x0: Tensor, labels: Tensor | None) -> ReferenceSet:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return ReferenceSet(x0, labels, None, None)
        world, rank, batch = dist.get_world_size(), dist.get_rank(), x0.shape[0]
        images = x0.new_empty((world * batch, *x0.shape[1:]))
        dist.all_gather_into_tensor(images, x0.contiguous())
        all_labels = None
        if labels is not None:
            all_labels = labels.new_empty(world * batch)
            dist.all_gather_into_tensor(all_labels, labels.contiguous())
        own = rank * batch + torch.arange(batch, device=x0.device)
        return ReferenceSet(images, all_labels, own, None)


class QueueReferences(ReferenceSource):
    """The minibatch plus a FIFO of the last ``reference_size - B`` training images (no extra loading).

    The queue fills over the first steps (fewer references until then) and is checkpointed.
    """

    def __init__(self, reference_size: int, seed: int = 0) -> None:
        super().__init__(reference_size, seed)
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        self.count = 0
        self.pointer = 0

    def references(self, x0: Tensor, labels: Tensor | None) -> ReferenceSet:
        self.check_batch(x0.shape[0])
        if self.images is None or self.count == 0:
            return ReferenceSet(x0, labels, None, None)
        queued = self.images[: self.count].to(x0.device, x0.dtype)
        refs = torch.cat([x0, queued])
        all_labels = None
        if labels is not None:
            all_labels = torch.cat([labels, self.labels[: self.count].to(labels.device)])
        return ReferenceSet(refs, all_labels, None, None)

    def after_step(self, x0: Tensor, labels: Tensor | None) -> None:
        capacity = self.reference_size - x0.shape[0]
        if capacity <= 0:
            return
        if self.images is None or self.images.shape[0] != capacity or self.images.device != x0.device:
            self.images = x0.new_zeros((capacity, *x0.shape[1:]))
            self.labels = torch.zeros(capacity, dtype=torch.long, device=x0.device)
            self.count = self.pointer = 0
        batch = x0.detach()[:capacity]
        slots = (self.pointer + torch.arange(batch.shape[0], device=x0.device)) % capacity
        self.images[slots] = batch
        if labels is not None:
            self.labels[slots] = labels[:capacity]
        self.pointer = (self.pointer + batch.shape[0]) % capacity
        self.count = min(capacity, self.count + batch.shape[0])

    def state_dict(self) -> dict[str, Any]:
        if self.images is None:
            return {"count": 0, "pointer": 0}
        return {"images": self.images.cpu(), "labels": self.labels.cpu(), "count": self.count, "pointer": self.pointer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.pointer = int(state.get("count", 0)), int(state.get("pointer", 0))
        self.images, self.labels = state.get("images"), state.get("labels")


_SOURCES = {"fresh": FreshReferences, "gather": GatheredReferences, "queue": QueueReferences, "batch": BatchReferences}


def make_reference_source(source: str, reference_size: int, seed: int = 0) -> ReferenceSource:
    """Build a source by name, with one clear error for bad settings."""
    if source not in _SOURCES:
        raise ValueError(f"StableTargetField.source={source!r} must be one of {sorted(_SOURCES)}.")
    if reference_size < 1:
        raise ValueError(f"StableTargetField.reference_size={reference_size} must be >= 1.")
    return _SOURCES[source](reference_size, seed)
