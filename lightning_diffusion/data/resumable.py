"""Training data order that resumes exactly: a seeded shuffle keyed by the batches already consumed.

Epoch ``e`` of the stream is ``randperm(N)`` drawn from a generator seeded with ``seed + e``, cut to
a multiple of ``world_size`` and dealt round-robin (rank ``r`` takes positions ``r, r + W, ...``);
each rank batches its share and drops the incomplete tail. Rank ``r``'s ``k``-th batch of the run
is therefore a pure function of ``(seed, world_size, rank, k)``.

:class:`ResumableDataLoader` counts the batches it hands out and stores the count in checkpoints
through Lightning's stateful-loader protocol (``state_dict``/``load_state_dict``, saved under
``loops.fit_loop.state_dict.combined_loader``). A run resumed from any checkpoint, mid-epoch or
not, continues with exactly the batch the uninterrupted run trained on next, whatever Lightning's
own epoch counter says. Every pass over the loader yields ``len(loader)`` batches from where the
previous pass stopped, crossing into the next epoch's order if a pass was cut short
(``limit_train_batches``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ImagesSeenSampler", "ResumableDataLoader"]


class ImagesSeenSampler(DistributedSampler):
    """Indices of the stream above from batch ``batches_seen`` on (a ``DistributedSampler``, so Lightning keeps it).

    Args:
        dataset: the training set.
        batch_size: images per batch on one rank.
        num_replicas: ranks sharing the data (``trainer.world_size``).
        rank: this rank (``trainer.global_rank``).
        seed: epoch ``e`` is shuffled with ``seed + e``.
        epoch_keyed: yield ``e * len(dataset) + index`` instead of ``index``, for datasets that draw
            per-epoch randomness from it (:class:`~lightning_diffusion.data.latent_data.LatentDataset`).
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 epoch_keyed: bool = False) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        if batch_size < 1:
            raise ValueError(f"ImagesSeenSampler.batch_size: got {batch_size}; give a positive integer.")
        if size // num_replicas < batch_size:
            raise ValueError(
                f"ImagesSeenSampler.batch_size: {batch_size} images per rank do not fit in {size} training images "
                f"shared by {num_replicas} ranks; give a batch_size of at most {size // num_replicas}."
            )
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        # DistributedSampler's drop_last keeps ceil((N - W) / W) per rank (one short when W divides N).
        self.num_samples = size // num_replicas
        self.total_size = self.num_samples * num_replicas
        self.batch_size = batch_size
        self.batches_per_epoch = self.num_samples // batch_size
        self.epoch_keyed = epoch_keyed
        self.batches_seen = 0  # advanced by ResumableDataLoader as batches are handed out, not as they are read ahead

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the position in the stream (``batches_seen``) picks the epoch, not Lightning's counter."""

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's ``batches_per_epoch * batch_size`` indices of stream epoch ``epoch``, in order."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        share = order[self.rank : self.total_size : self.num_replicas]
        return share[: len(self)]

    def __iter__(self) -> Iterator[int]:
        # One pass = len(self) indices from the current position, crossing epochs if needed.
        epoch, offset = divmod(self.batches_seen, self.batches_per_epoch)
        remaining = len(self)
        start = offset * self.batch_size
        while remaining > 0:
            chunk = self.epoch_indices(epoch)[start : start + remaining]
            yield from (chunk + epoch * len(self.dataset) if self.epoch_keyed else chunk).tolist()
            remaining -= len(chunk)
            epoch, start = epoch + 1, 0

    def layout(self) -> dict[str, int]:
        """What the position means: the same count under another layout is another point in the data."""
        return {"batch_size": self.batch_size, "world_size": self.num_replicas, "seed": self.seed,
                "dataset_size": len(self.dataset)}  # type: ignore[arg-type]

    def move_to(self, batches_seen: int, layout: dict[str, int]) -> None:
        """Continue from ``batches_seen`` batches counted under ``layout`` (exact when it is this one)."""
        if layout == self.layout():
            self.batches_seen = int(batches_seen)
            return
        images = int(batches_seen) * layout["batch_size"] * layout["world_size"]
        self.batches_seen = images // (self.batch_size * self.num_replicas)
        rank_zero_warn(
            f"Training data order: the checkpoint counted batches under {layout} and this run uses {self.layout()}; "
            f"continuing after {self.batches_seen * self.batch_size * self.num_replicas} of the {images} images seen, "
            "in this layout's order (a resume is exact only with the same batch size, devices, seed and data)."
        )


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`ImagesSeenSampler` whose position is saved in checkpoints.

    Counts a batch when it is handed to the caller (worker read-ahead does not count), so a
    checkpoint written after step ``k`` stores exactly the batches trained on.

    Example::

        sampler = ImagesSeenSampler(dataset, batch_size=64, num_replicas=trainer.world_size,
                                    rank=trainer.global_rank, seed=0)
        loader = ResumableDataLoader(dataset, batch_size=64, sampler=sampler, drop_last=True)
    """

    sampler: ImagesSeenSampler

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if not isinstance(self.sampler, ImagesSeenSampler):
            raise TypeError(f"ResumableDataLoader.sampler: got {type(self.sampler).__name__}; give an ImagesSeenSampler.")
        for batch in super().__iter__():
            self.sampler.batches_seen += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position (batches this rank has handed out) and the layout it was counted in."""
        return {"batches_seen": self.sampler.batches_seen, **self.sampler.layout()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the batches counted in ``state`` (Lightning calls this on resume)."""
        layout = {key: int(state[key]) for key in ("batch_size", "world_size", "seed", "dataset_size")}
        self.sampler.move_to(state["batches_seen"], layout)
