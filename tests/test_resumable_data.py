"""The training data order is a pure function of (seed, world size, rank, batches consumed), and
the loader's position travels in checkpoints (lightning_diffusion/data/resumable.py)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_diffusion.data import DigitsDataModule, ImagesSeenSampler, ResumableDataLoader


def _loader(size: int = 100, batch: int = 8, world: int = 1, rank: int = 0, seed: int = 0, **kwargs) -> ResumableDataLoader:
    data = TensorDataset(torch.arange(size))
    sampler = ImagesSeenSampler(data, batch, world, rank, seed)
    return ResumableDataLoader(data, batch_size=batch, sampler=sampler, drop_last=True, **kwargs)


def _ids(batches) -> list[list[int]]:
    return [b[0].tolist() for b in batches]


def test_each_epoch_is_a_seeded_permutation_and_passes_continue_the_stream():
    loader = _loader()
    assert len(loader) == 12  # 100 // 8, tail dropped
    first, second = _ids(loader), _ids(loader)
    assert len(first) == len(second) == 12 and loader.sampler.batches_seen == 24
    for epoch, batches in enumerate((first, second)):
        flat = sum(batches, [])
        assert len(set(flat)) == 96  # no image twice in an epoch
        order = torch.randperm(100, generator=torch.Generator().manual_seed(epoch))  # seed + epoch
        assert flat == order[:96].tolist()
    assert first != second and _ids(_loader()) == first and _ids(_loader(seed=1)) != first


def _loader_at(position: int) -> ResumableDataLoader:
    loader = _loader()
    loader.sampler.batches_seen = position
    return loader


def test_a_loader_moved_to_a_position_yields_what_the_uninterrupted_one_would():
    stream = _loader()
    want = _ids(stream) + _ids(stream) + _ids(stream)  # 36 batches: three epochs
    for k in (0, 5, 11, 12, 13, 23):
        moved = _loader()
        moved.load_state_dict({**stream.state_dict(), "batches_seen": k})  # what a resume does
        assert _ids(moved) == want[k : k + 12], k


def test_ranks_get_disjoint_shares_of_each_epoch():
    shares = [sum(_ids(_loader(size=101, batch=5, world=2, rank=r)), []) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 50  # 101 // 2 = 50 each, 10 batches of 5
    assert not set(shares[0]) & set(shares[1])
    order = torch.randperm(101, generator=torch.Generator().manual_seed(0))
    assert shares[0] == order[0:100:2].tolist() and shares[1] == order[1:100:2].tolist()


def test_worker_read_ahead_is_not_counted():
    loader = _loader(num_workers=2)
    iterator = iter(loader)
    taken = [next(iterator)[0].tolist() for _ in range(3)]  # the workers have read further ahead
    state = loader.state_dict()
    assert state["batches_seen"] == 3
    resumed = _loader()
    resumed.load_state_dict(state)
    assert _ids(resumed)[0] == _ids(_loader())[3] and taken == _ids(_loader())[:3]


def test_a_cut_short_pass_is_continued_by_the_next_one():
    loader = _loader()
    iterator = iter(loader)
    head = [next(iterator)[0].tolist() for _ in range(3)]  # e.g. limit_train_batches=3
    rest = _ids(loader)
    assert len(rest) == 12  # a full pass from batch 3: 9 of epoch 0, then 3 of epoch 1
    whole = _ids(_loader_at(0)) + _ids(_loader_at(12))
    assert head + rest == whole[:15]


def test_another_layout_continues_after_the_same_images_with_a_warning():
    loader = _loader(batch=8, world=2)
    state = {**_loader(batch=8, world=1).state_dict(), "batches_seen": 10}  # 80 images seen on one device
    with pytest.warns(UserWarning, match=r"continuing after 80 of the 80 images seen"):
        loader.load_state_dict(state)
    assert loader.sampler.batches_seen == 5  # 5 steps x 2 ranks x 8 images


def test_batch_larger_than_a_rank_share_is_refused():
    with pytest.raises(ValueError, match=r"ImagesSeenSampler.batch_size: 60 images per rank do not fit in 100 "
                                         r"training images shared by 2 ranks; give a batch_size of at most 50"):
        _loader(batch=60, world=2)
    dm = DigitsDataModule(batch_size=1000)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(ValueError, match=r"DigitsDataModule.batch_size: 1000 images per rank do not fit in 1617"):
        dm.train_dataloader()


def test_datamodule_shards_by_trainer_rank_and_a_reloaded_loader_continues():
    dm = DigitsDataModule(batch_size=16)
    trainer = SimpleNamespace(world_size=2, global_rank=1)
    dm.trainer = trainer
    loader = dm.train_dataloader()
    assert (loader.sampler.num_replicas, loader.sampler.rank, len(loader)) == (2, 1, 808 // 16)
    next(iter(loader))
    assert dm.train_dataloader().sampler.batches_seen == 1  # reload_dataloaders_every_n_epochs: same fit
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)  # a new fit starts at the beginning
    assert dm.train_dataloader().sampler.batches_seen == 0


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0].flatten(1)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_saves_the_position_and_resumes_mid_epoch_without_warning(tmp_path, recwarn):
    dm = DigitsDataModule(batch_size=128)  # 12 batches per epoch
    kwargs = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=tmp_path, limit_val_batches=0)
    trainer = L.Trainer(max_steps=17, **kwargs)
    trainer.fit(_Tiny(), dm)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"batches_seen": 17, "batch_size": 128, "world_size": 1, "seed": 0, "dataset_size": 1617}]
    resumed = DigitsDataModule(batch_size=128)
    L.Trainer(max_steps=20, **kwargs).fit(_Tiny(), resumed, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed._train_loader[1].sampler.batches_seen == 20
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
