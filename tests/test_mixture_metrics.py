"""GaussianMixtureMetrics: exact numbers for a known denoiser, a real model approaching the Bayes error."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from conftest import quiet_trainer, tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import GaussianMixtureMetrics
from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.core.weighting import EDMWeighting
from lightning_diffusion.data import DigitsDataModule, GaussianMixture, GaussianMixtureDataModule
from lightning_diffusion.protocol import step_output

pytestmark = pytest.mark.usefixtures("one_thread")


class Oracle(pl.LightningModule):
    """Not our module: denoises with the mixture's exact posterior mean plus ``offset``, samples from it."""

    def __init__(self, mixture: GaussianMixture, process, offset: float = 0.0) -> None:
        super().__init__()
        self.mixture, self.process, self.offset = mixture, process, offset
        self.num_classes = mixture.num_classes
        self.w = torch.nn.Parameter(torch.zeros(()))

    def denoise(self, x_noisy, level, labels):
        a, s = self.process.alpha_sigma(level)
        return self.mixture.posterior_mean(x_noisy, a, s, labels) + self.offset

    def sample(self, num_samples, class_labels=None, generator=None, clamp=True):
        return self.mixture.sample(num_samples, generator, class_labels)[0]

    def training_step(self, batch, batch_idx):
        loss = (self.w - 1).square()
        return step_output(loss, loss.detach().expand(1), torch.zeros(1), torch.ones(1))

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Wobbly(Oracle):
    """An error that differs from sample to sample, so each rank's share scores differently."""

    def denoise(self, x_noisy, level, labels):
        return super().denoise(x_noisy, level, labels) + 0.1 * x_noisy.tanh()


def _validate(module, callback, data=None, **trainer_kwargs):
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1, val_check_interval=1, callbacks=[callback],
                            **trainer_kwargs)
    trainer.fit(module, data or GaussianMixtureDataModule(batch_size=16, train_size=64, val_size=16))
    return {k: v.item() for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("process", [EDMProcess(), VPProcess("cosine", 1000)], ids=["edm", "vp"])
def test_the_exact_denoiser_scores_zero_and_an_offset_scores_its_square(process):
    mixture = GaussianMixture.digits()
    callback = GaussianMixtureMetrics(eval_size=128, num_samples=500)
    exact = _validate(Oracle(mixture, process), callback)
    assert exact["val/excess_pct"] == pytest.approx(0.0, abs=1e-3)
    assert all(exact[f"val/excess_pct_level{i}"] == pytest.approx(0.0, abs=1e-3) for i in range(8))
    # True samples score like the metric's own floor (other draws of the same size).
    assert exact["val/fd_exact"] == pytest.approx(callback.floors["fd_exact"], rel=0.5)
    assert exact["val/class_accuracy"] == pytest.approx(callback.floors["class_accuracy"], abs=0.05)
    assert abs(exact["val/nll_gap"]) < 0.05 and abs(callback.floors["nll_gap"]) < 0.05

    callback = GaussianMixtureMetrics(eval_size=128)
    off = _validate(Oracle(mixture, process, offset=0.1), callback)
    bayes = callback.evaluation.bayes
    assert off["val/excess"] == pytest.approx(8 * 0.01, rel=1e-4)  # 0.1^2 per pixel at each of 8 levels
    for i in range(8):
        assert off[f"val/excess_pct_level{i}"] == pytest.approx(100 * 0.01 / bayes[i].item(), rel=1e-4)
    geometric = 100 * ((1 + 0.01 / bayes).log().mean().exp() - 1)
    assert off["val/excess_pct"] == pytest.approx(geometric.item(), rel=1e-4)
    assert "val/fd_exact" not in off  # no samples asked for


@pytest.mark.timeout(180)
def test_two_ranks_split_the_work_and_log_the_single_process_numbers():
    mixture = GaussianMixture.digits()
    one = _validate(Wobbly(mixture, EDMProcess()), GaussianMixtureMetrics(eval_size=130, num_samples=200))
    two = _validate(Wobbly(mixture, EDMProcess()), GaussianMixtureMetrics(eval_size=130, num_samples=200),
                    devices=2, strategy="ddp_spawn")  # 130 images: 65 per rank, summed
    assert one.keys() == two.keys() and "val/fd_exact" in one
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_trained_model_approaches_the_bayes_error():
    pl.seed_everything(0)
    module = DiffusionLightningModule(
        tiny_unet(num_classes=10), process=EDMProcess(), prediction="x0", weighting=EDMWeighting(),
        num_classes=10, label_dropout=0.1, optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    callback = GaussianMixtureMetrics(eval_size=256)
    scores = []

    class Keep(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            scores.append(trainer.callback_metrics["val/excess_pct"].item())

    trainer = quiet_trainer(max_steps=300, limit_val_batches=1, val_check_interval=50, callbacks=[callback, Keep()])
    trainer.fit(module, GaussianMixtureDataModule(batch_size=64, train_size=8192))
    # measured: about 190% above the Bayes error after 50 steps, 40-60% after 300 (a generous bound)
    assert scores[-1] < 100.0 and scores[-1] < 0.6 * scores[0], scores


def test_refusals_name_the_setting():
    with pytest.raises(ValueError, match="GaussianMixtureMetrics.eval_size"):
        GaussianMixtureMetrics(eval_size=0)
    with pytest.raises(ValueError, match="GaussianMixtureMetrics.sigma_min"):
        GaussianMixtureMetrics(sigma_min=5.0, sigma_max=1.0)
    module = DiffusionLightningModule(tiny_unet(), process=EDMProcess(), prediction="x0")
    with pytest.raises(ValueError, match="GaussianMixtureDataModule"):
        _validate(module, GaussianMixtureMetrics(), DigitsDataModule(batch_size=16))
    class NoValidation(Oracle):
        validation_step = pl.LightningModule.validation_step

    with pytest.raises(ValueError, match="has no validation_step, so Lightning never validates"):
        _validate(NoValidation(GaussianMixture.digits(), EDMProcess()), GaussianMixtureMetrics())
    oracle = Oracle(GaussianMixture.digits(), EDMProcess())
    oracle.denoise = None
    with pytest.raises(ValueError, match="needs the module's `denoise`"):
        _validate(oracle, GaussianMixtureMetrics())


def test_validation_count_is_checkpoint_state():
    callback = GaussianMixtureMetrics(num_samples=10, sample_every_n_validations=3)
    callback.load_state_dict({"validations": 5})
    assert callback.state_dict() == {"validations": 5}
