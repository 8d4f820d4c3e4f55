"""EDM2 learning-rate schedule (docs/algorithms.md 3.3): formula, per-step rates in a run, resume, YAML."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer, tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.optim import EDM2LRScheduler, edm2_lr_factor


@pytest.mark.parametrize("nimg,expected", [
    (0, 0.0),                          # start of the ramp
    (500, 0.5),                        # half-way up the ramp
    (1000, 1.0), (4000, 1.0),          # plateau until ref_images
    (16000, 0.5),                      # 1/sqrt(16000/4000)
    (400000, 0.1),                     # 1/sqrt(100)
])
def test_factor_matches_ramp_times_inverse_sqrt(nimg, expected):
    assert edm2_lr_factor(nimg, ref_images=4000, rampup_images=1000) == pytest.approx(expected)


def test_ramp_and_decay_can_be_turned_off():
    assert edm2_lr_factor(10, ref_images=0, rampup_images=0) == 1.0
    assert edm2_lr_factor(90, ref_images=10, rampup_images=0) == pytest.approx(1 / 3)


def test_scheduler_counts_images_after_each_step_and_resumes():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=0.01)
    sched = EDM2LRScheduler(opt, batch_size=100, ref_images=1000, rampup_images=400)
    rates = []
    for _ in range(40):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.01 * min((k + 1) * 100 / 400, 1) / math.sqrt(max((k + 1) * 100 / 1000, 1)) for k in range(40)]
    assert rates == pytest.approx(expected)
    resumed_opt = torch.optim.Adam([param], lr=0.01)
    resumed = EDM2LRScheduler(resumed_opt, batch_size=100, ref_images=1000, rampup_images=400)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.last_epoch == 40  # the next step, 41, has seen 4100 images
    assert resumed.get_lr()[0] == pytest.approx(0.01 / math.sqrt(4.1))


def test_bad_settings_fail_in_one_sentence():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    with pytest.raises(ValueError, match=r"EDM2LRScheduler.batch_size=0 must be >= 1"):
        EDM2LRScheduler(opt, batch_size=0)
    with pytest.raises(ValueError, match=r"EDM2LRScheduler.ref_images=-1 .* must be >= 0"):
        EDM2LRScheduler(opt, batch_size=8, ref_images=-1)


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_rates_in_a_lightning_run_with_accumulation_follow_the_image_clock():
    record = _RecordLR()
    module = DiffusionLightningModule(
        tiny_unet(), optimizer=functools.partial(torch.optim.Adam, lr=0.01),
        lr_scheduler=functools.partial(EDM2LRScheduler, batch_size=8, ref_images=32, rampup_images=24))
    data = DataLoader(TensorDataset(torch.rand(40, 1, 8, 8)), batch_size=4)
    quiet_trainer(max_steps=5, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[record]).fit(module, data)
    # 4 images per micro-batch x 2 micro-batches = 8 images per optimizer step
    expected = [0.01 * edm2_lr_factor(8 * (k + 1), 32, 24) for k in range(5)]
    assert record.rates == pytest.approx(expected)


def test_batch_size_follows_the_trainer_when_unset():
    """No batch_size: the module reads images per step (per-device batch x accumulation) from the trainer."""
    from lightning_diffusion.data import DigitsDataModule

    record = _RecordLR()
    module = DiffusionLightningModule(
        tiny_unet(num_classes=10), num_classes=10, optimizer=functools.partial(torch.optim.Adam, lr=0.01),
        lr_scheduler=functools.partial(EDM2LRScheduler, ref_images=48, rampup_images=36))
    quiet_trainer(max_steps=6, accumulate_grad_batches=3, limit_val_batches=0,
                  callbacks=[record]).fit(module, datamodule=DigitsDataModule(batch_size=4))
    expected = [0.01 * edm2_lr_factor(12 * (k + 1), 48, 36) for k in range(6)]  # 4 x 3 images per step
    assert record.rates == pytest.approx(expected)
    assert module.trainer.lr_scheduler_configs[0].scheduler.batch_size == 12


def test_unset_batch_size_outside_a_module_is_a_clear_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = EDM2LRScheduler(opt, ref_images=100, rampup_images=0)
    assert opt.param_groups[0]["lr"] == 1.0  # untouched until the batch size is known
    opt.step()
    with pytest.raises(RuntimeError, match="EDM2LRScheduler.batch_size is unset"):
        sched.step()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = EDM2LRScheduler(opt, ref_images=100, rampup_images=0)
    sched.set_batch_size(50)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(2):
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates == pytest.approx([1.0, 1.0, 1.0 / math.sqrt(1.5)])  # after 50, 100, 150 images
