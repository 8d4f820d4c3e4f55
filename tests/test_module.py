"""DiffusionLightningModule: learning, the clock, outputs for callbacks, checkpoints, precision, compile."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from conftest import quiet_trainer, tiny_unet
from lightning_diffusion import DiffusionLightningModule, EDMProcess, MinSNRWeighting, VPProcess
from lightning_diffusion.clock import images_seen
from lightning_diffusion.core.weighting import EDMWeighting, min_snr_weight
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.timesteps import LogNormalSigma, UniformTimesteps

ADAM = functools.partial(torch.optim.Adam, lr=2e-3)


def _val_loss(module: DiffusionLightningModule, dm: DigitsDataModule) -> float:
    return quiet_trainer().validate(module, datamodule=dm, verbose=False)[0]["val/loss"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prediction="eps", weighting=MinSNRWeighting(5.0)),
        dict(process=EDMProcess(), prediction="x0", weighting=EDMWeighting()),
    ],
    ids=["vp-eps-minsnr", "edm"],
)
def test_training_lowers_validation_loss(kwargs):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    module = DiffusionLightningModule(tiny_unet(), optimizer=ADAM, **kwargs)
    before = _val_loss(module, dm)
    quiet_trainer(max_steps=150, limit_val_batches=0).fit(module, datamodule=dm)
    after = _val_loss(module, dm)
    assert after < 0.8 * before, (before, after)


class _Recorder(pl.Callback):
    def __init__(self):
        self.outputs, self.nimg = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: v.detach().clone() for k, v in outputs.items()})
        self.nimg.append(images_seen(trainer))


def test_outputs_and_clock_with_gradient_accumulation():
    dm = DigitsDataModule(batch_size=16)
    module = DiffusionLightningModule(tiny_unet(), process=VPProcess(num_timesteps=100),
                                      weighting=MinSNRWeighting(2.0), optimizer=ADAM)
    rec = _Recorder()
    quiet_trainer(max_steps=5, accumulate_grad_batches=2, callbacks=[rec], limit_val_batches=0).fit(module, dm)
    assert len(rec.outputs) == 10  # micro-batches
    assert module.draws == 10 and module.global_step == 5
    assert images_seen(module.trainer) == 5 * 16 * 1 * 2
    out = rec.outputs[-1]
    assert set(out) >= {"loss", "per_sample_loss", "level", "importance_weight", "mse"}
    assert out["level"].dtype == torch.long and out["level"].shape == (16,)
    snr = module.process.snr(out["level"])
    expected = min_snr_weight(snr, 2.0, "eps") * out["mse"]
    torch.testing.assert_close(out["per_sample_loss"], expected)
    # Lightning hands callbacks the loss already divided by accumulate_grad_batches.
    torch.testing.assert_close(out["loss"] * 2, (out["per_sample_loss"] * out["importance_weight"]).mean())
    # Every micro-batch draws fresh levels.
    assert not torch.equal(rec.outputs[0]["level"], rec.outputs[1]["level"])


def test_noise_streams_are_keyed_by_draws_and_rank():
    module = DiffusionLightningModule(tiny_unet())
    a = torch.rand(4, generator=module.step_generator(torch.device("cpu"), 7))
    b = torch.rand(4, generator=module.step_generator(torch.device("cpu"), 8))
    c = torch.rand(4, generator=module.step_generator(torch.device("cpu"), 7))
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_checkpoint_round_trip(tmp_path):
    dm = DigitsDataModule(batch_size=32, num_workers=0)
    module = DiffusionLightningModule(tiny_unet(num_classes=10), num_classes=10, label_dropout=0.2,
                                      optimizer=ADAM, prediction="v")
    trainer = quiet_trainer(max_steps=12, limit_val_batches=0)
    trainer.fit(module, dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # plain contents only: no pickled classes
    assert raw["diffusion"]["draws"] == 12 and raw["diffusion"]["image_shape"] == [1, 8, 8]
    assert raw["hyper_parameters"]["prediction"] == "v"
    restored = DiffusionLightningModule(tiny_unet(num_classes=10), num_classes=10, prediction="v")
    restored.on_load_checkpoint(raw)
    restored.load_state_dict(raw["state_dict"])
    for key, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)
    assert restored.draws == 12 and restored.image_shape == (1, 8, 8)
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(4)
    a = module.sample(4, class_labels=labels, num_steps=4, generator=gen)
    b = restored.sample(4, class_labels=labels, num_steps=4, generator=gen.manual_seed(3))
    torch.testing.assert_close(a, b)


def test_bf16_mixed_lowers_loss():
    pl.seed_everything(1)
    dm = DigitsDataModule(batch_size=64)
    module = DiffusionLightningModule(tiny_unet(), prediction="v", optimizer=ADAM)
    before = _val_loss(module, dm)
    quiet_trainer(max_steps=120, precision="bf16-mixed", limit_val_batches=0).fit(module, dm)
    assert _val_loss(module, dm) < 0.8 * before


@pytest.mark.slow
def test_compiled_network_lowers_loss():
    pl.seed_everything(2)
    dm = DigitsDataModule(batch_size=64)
    module = DiffusionLightningModule(tiny_unet(), prediction="eps", optimizer=ADAM, compile=True)
    before = _val_loss(module, dm)
    quiet_trainer(max_steps=60, limit_val_batches=0).fit(module, dm)
    assert module.net._compiled_call_impl is not None
    assert _val_loss(module, dm) < 0.9 * before
    assert not any(k.startswith("net._orig_mod") for k in module.state_dict())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(prediction="noise"), "prediction='noise'"),
        (dict(process=EDMProcess(), prediction="eps"), "prediction='eps'"),
        (dict(timesteps=UniformTimesteps(500)), "timesteps.num_timesteps=500"),
        (dict(timesteps=LogNormalSigma()), "timesteps=LogNormalSigma"),
        (dict(label_dropout=1.5), "label_dropout=1.5"),
        (dict(sample_solver="rk4"), "sample_solver='rk4'"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        DiffusionLightningModule(tiny_unet(), **kwargs)


def test_label_dropout_rate():
    module = DiffusionLightningModule(tiny_unet(num_classes=10), num_classes=10, label_dropout=0.25)
    labels = torch.randint(0, 10, (20000,))
    dropped = module.drop_labels(labels, torch.Generator().manual_seed(0))
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.25) < 0.015
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
