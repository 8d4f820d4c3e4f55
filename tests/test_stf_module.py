"""Stable Target Field inside training: module, checkpoints, validation, errors, DDP gathering, YAML."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.core.noise import EDMProcess
from lightning_diffusion.core.targets import StableTargetField
from lightning_diffusion.core.weighting import EDMWeighting, MinSNRWeighting
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.validation import validation_losses

from conftest import quiet_trainer, tiny_unet


def _stf_module(source="fresh", reference_size=96, **kwargs):
    defaults = dict(prediction="eps", weighting=MinSNRWeighting(5.0), num_classes=10, label_dropout=0.1,
                    target=StableTargetField(reference_size=reference_size, source=source, class_conditional=True))
    defaults.update(kwargs)
    return DiffusionLightningModule(tiny_unet(num_classes=defaults["num_classes"]), **defaults)


def test_training_with_fresh_references_checkpoints_and_resumes_the_stream(tmp_path):
    module = _stf_module()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert module.target.source.consumed == 3
    path = tmp_path / "stf.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["diffusion"]["target"] == {"consumed": 3}
    resumed = _stf_module()
    quiet_trainer(max_steps=5, limit_val_batches=0).fit(resumed, datamodule=DigitsDataModule(batch_size=32),
                                                         ckpt_path=path)
    assert resumed.target.source.consumed == 5


def test_edm_with_a_queue_fills_it_and_saves_it(tmp_path):
    module = DiffusionLightningModule(tiny_unet(), process=EDMProcess(), prediction="x0", weighting=EDMWeighting(),
                                      target=StableTargetField(reference_size=80, source="queue"))
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    source = module.target.source
    assert source.count == 48 and source.images.shape == (48, 1, 8, 8)
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    state = torch.load(tmp_path / "q.ckpt", weights_only=True)["diffusion"]["target"]
    assert state["count"] == 48 and torch.equal(state["images"], source.images)


def test_validation_measures_the_standard_objective():
    data = DigitsDataModule(batch_size=32)
    x0, labels = next(iter(data.val_dataloader()))
    stf, standard = _stf_module(), _stf_module(target=None)
    standard.net.load_state_dict(stf.net.state_dict())
    losses = [validation_losses(m, x0, labels, torch.Generator().manual_seed(0)) for m in (stf, standard)]
    assert torch.equal(losses[0]["loss"], losses[1]["loss"])


def test_reference_size_below_the_batch_fails_before_any_step():
    module = _stf_module(reference_size=16)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"reference_size=16 must be >= the per-device batch size 32"):
        quiet_trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


class _RecordingSTF(StableTargetField):
    """Saves each rank's reference set of the first step (ddp_spawn: assert on files)."""

    def __init__(self, directory: str) -> None:
        super().__init__(reference_size=1, source="gather")
        self.directory = directory

    def __call__(self, param, x0, noise, x_noisy, level, class_labels=None):
        refs = self.source.references(x0, class_labels)
        path = os.path.join(self.directory, f"rank{dist.get_rank()}.pt")
        if not os.path.exists(path):
            torch.save({"images": refs.images, "own": refs.own_index, "x0": x0}, path)
        return super().__call__(param, x0, noise, x_noisy, level, class_labels)


@pytest.mark.timeout(120)
def test_ddp_gathered_references_are_shared_by_both_ranks(tmp_path):
    module = DiffusionLightningModule(tiny_unet(), prediction="v", target=_RecordingSTF(str(tmp_path)))
    quiet_trainer(max_steps=2, limit_val_batches=0, devices=2, strategy="ddp_spawn").fit(
        module, datamodule=DigitsDataModule(batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ranks[0]["images"], ranks[1]["images"]) and ranks[0]["images"].shape[0] == 32
    assert not torch.equal(ranks[0]["x0"], ranks[1]["x0"])
    for r, rec in enumerate(ranks):
        assert torch.equal(rec["own"], torch.arange(16) + 16 * r)
        assert torch.equal(rec["images"][rec["own"]], rec["x0"])

