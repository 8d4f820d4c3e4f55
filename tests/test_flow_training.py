"""Every technique of the library trains on the rectified-flow process: in one process, under 2-rank
DDP through the CLI, and from configs/flow.yaml (docs/algorithms.md 6)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from digest_callback import subprocess_env  # tests/ is on sys.path
from test_full_stack_ddp import _check_run, _fit_args

from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import (AdaptiveTimestepSampling, LossAwareTimestepSampling, PostHocEMA, SampleGrid,
                                           TimestepCurriculum)
from lightning_diffusion.core.noise import RectifiedFlowProcess
from lightning_diffusion.core.perturb import training_noise
from lightning_diffusion.core.targets import StableTargetField
from lightning_diffusion.core.weighting import MinSNRWeighting
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.networks import UNet, UncertaintyHead
from lightning_diffusion.timesteps import LogitNormalTimesteps, ShiftedTimesteps


def _flow_module(**kwargs) -> DiffusionLightningModule:
    torch.manual_seed(0)
    defaults = dict(process=RectifiedFlowProcess(), prediction="flow", weighting=MinSNRWeighting(5.0),
                    num_classes=10, label_dropout=0.1, fd_samples=32, sample_steps=3,
                    timesteps=ShiftedTimesteps(LogitNormalTimesteps(), shift=1.5),
                    optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    defaults.update(kwargs)
    return DiffusionLightningModule(UNet(in_channels=1, image_size=8, model_channels=16, num_classes=10), **defaults)


def _trainer(tmp_path, callbacks, steps):
    return pl.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=steps, limit_val_batches=2,
                      check_val_every_n_epoch=None, logger=False, callbacks=callbacks, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, log_every_n_steps=5)


@pytest.mark.timeout(300)
def test_the_whole_stack_trains_on_flow(tmp_path):
    """Min-SNR (velocity space), STF, EDM2 uncertainty, offset noise and input perturbation in the module;
    loss-aware sampling inside the curriculum, post-hoc EMA and sample grids as callbacks."""
    module = _flow_module(target=StableTargetField(reference_size=64, source="fresh", class_conditional=True),
                          uncertainty=UncertaintyHead(), offset_noise=0.1, input_perturbation=0.1)
    curriculum = TimestepCurriculum(num_clusters=4, pacing="fixed", steps_per_stage=4, verbose=False)
    ema = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_every_nimg=8 * 32, dirpath=str(tmp_path / "phema"),
                     validate_with=0.10)
    grid = SampleGrid(num_samples=10, dirpath=str(tmp_path / "samples"))
    callbacks = [LossAwareTimestepSampling(history=2, log_distribution_every=0), curriculum, ema, grid]
    trainer = _trainer(tmp_path, callbacks, steps=24)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert trainer.global_step == 24
    assert curriculum.stage == 4 and len(curriculum.switches) == 3  # every stage of t visited, in order
    assert type(module.timesteps).__name__ == "LossAwareTimesteps"
    assert type(module.timesteps.base).__name__ == "ShiftedTimesteps"
    assert ema.ema.num_updates == 24 and len(list((tmp_path / "phema").glob("phema-*.pt"))) == 3 * 2
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and torch.isfinite(metrics["val/fd"])
    assert list((tmp_path / "samples").glob("*.png"))
    images = module.sample(6, class_labels=torch.arange(6), guidance=2.0)
    assert images.shape == (6, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.timeout(300)
def test_adaptive_sampler_trains_on_flow_and_vlb_reward_is_refused(tmp_path):
    adaptive = AdaptiveTimestepSampling(update_every=4, probe_grid=6, log_distribution_every=0, show_subset=False)
    trainer = _trainer(tmp_path, [adaptive], steps=12)
    module = _flow_module(fd_samples=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert trainer.global_step == 12 and adaptive.updates == 3
    drawn = module.timesteps.last_level
    assert drawn.dtype == torch.float32 and 0 <= drawn.min() and drawn.max() <= 1  # flow times t
    with pytest.raises(ValueError, match="reward='vlb' needs a VPProcess"):
        pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                   callbacks=[AdaptiveTimestepSampling(reward="vlb", show_subset=False)]).fit(
            _flow_module(fd_samples=0), datamodule=DigitsDataModule(batch_size=32))


def test_input_perturbation_reaches_the_input_and_not_the_target():
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, level, labels=None):
            seen["x"] = x
            return torch.zeros_like(x) + self.p

    module = DiffusionLightningModule(Spy(), process=RectifiedFlowProcess(), prediction="flow",
                                      offset_noise=0.1, input_perturbation=0.1)
    x0 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = module.diffusion_loss(x0, None, torch.Generator().manual_seed(5))
    # The same draws by hand, in the module's order: levels, then the noises.
    gen = torch.Generator().manual_seed(5)
    level, _ = module.timesteps.sample(16, "cpu", gen)
    noise, input_noise = training_noise(x0, gen, 0.1, 0.1)
    assert torch.equal(out["level"], level)
    assert torch.allclose(seen["x"], module.process.add_noise(x0, input_noise, level))
    # Output 0, constant weight: the loss is the mean square of the target, eps - x0 with the target noise.
    assert torch.allclose(out["mse"], (noise - x0).square().flatten(1).mean(1), rtol=1e-6)


@pytest.mark.timeout(420)
def test_full_stack_on_flow_two_cpu_ranks(tmp_path):
    """configs/full_stack.yaml switched to rectified flow, 2 CPU ranks: the ranks agree bit for bit."""
    start = time.monotonic()
    args = [a for a in _fit_args(tmp_path) if "num_timesteps" not in a]
    args += ["--model.init_args.process=lightning_diffusion.core.noise.RectifiedFlowProcess",
             "--model.init_args.prediction=flow",
             "--model.init_args.timesteps=lightning_diffusion.timesteps.LogitNormalTimesteps"]
    (tmp_path / "node0").mkdir()
    result = subprocess.run([sys.executable, "-m", "lightning_diffusion", *args], cwd=tmp_path / "node0",
                            env=subprocess_env(tmp_path / "digests"), capture_output=True, text=True, timeout=360)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = _check_run(tmp_path)
    assert rank0["timesteps_type"] == "LossAwareTimesteps"
    print(f"flow, two CPU ranks: {time.monotonic() - start:.1f} s")


@pytest.mark.timeout(300)
def test_flow_recipe_and_its_errors_from_the_command_line(tmp_path):
    base = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", "configs/flow.yaml",
            "--trainer.max_steps=6", "--trainer.val_check_interval=6", "--trainer.limit_val_batches=1",
            "--model.init_args.fd_samples=16", f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.enable_progress_bar=false"]
    root = Path(__file__).resolve().parents[1]
    ok = subprocess.run(base, cwd=root, capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert list((tmp_path / "run").rglob("last.ckpt")) and list((tmp_path / "run").rglob("*.png"))
    # One of the settings test_flow.py refuses, through the real command line (the others take the same path).
    for override, words in [("--model.init_args.timesteps.init_args.std=0", "LogitNormalTimesteps.std=0.0 must be > 0")]:
        bad = subprocess.run(base[:-2] + [f"--trainer.default_root_dir={tmp_path / 'bad'}", override], cwd=root,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2, (override, bad.stderr[-2000:])
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in bad.stderr, bad.stderr
        assert not (tmp_path / "bad").exists()
