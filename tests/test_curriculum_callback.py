"""TimestepCurriculum callback: stage supports in training, accumulation, checks, resume, DDP, composition."""

from __future__ import annotations

import functools
import json
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer, tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import TimestepCurriculum
from lightning_diffusion.core.noise import EDMProcess
from lightning_diffusion.core.weighting import MinSNRWeighting, min_snr_weight
from lightning_diffusion.timesteps import PatiencePacer, TimestepDistribution, stage_support

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def scripted_loss(step: int, rank: int) -> float:
    """A deterministic loss stream: rank 0 flat; rank 1 decreasing until step 10, then flat."""
    return 1.0 + (0.1 * max(0, 10 - step) if rank == 1 else 0.0)


def wiggly_loss(step: int, rank: int) -> float:
    """A pseudo-random stream that makes the pacer switch at irregular steps."""
    return 1.0 + 0.3 * ((step * 7919) % 13) / 13


class ScriptedModule(DiffusionLightningModule):
    """Trains normally but reports a scripted per-sample loss (a function of step and rank)."""

    def __init__(self, script=scripted_loss, **kwargs):
        super().__init__(tiny_unet(), optimizer=ADAM, **kwargs)
        self.script = script

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        value = self.script(self.global_step, self.global_rank)  # step before this optimizer step
        out["per_sample_loss"] = torch.full_like(out["per_sample_loss"], value)
        return out


def expected_switches(losses: list[float], num_stages: int, patience: int) -> list[int]:
    pacer = PatiencePacer(num_stages, patience)
    return [i for i, loss in enumerate(losses, 1) if pacer.step(loss)]


def _loader(n: int = 16, batch_size: int = BATCH) -> DataLoader:
    # Every batch is the same image: a straight and a resumed run see identical data.
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    return DataLoader(TensorDataset(image.expand(n, 1, 8, 8).clone()), batch_size=batch_size)


class SupportProbe(pl.Callback):
    """Checks every drawn level against the support in force when it was drawn."""

    def __init__(self):
        self.u_low, self.violations, self.stages = None, 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.u_low = pl_module.timesteps.u_low  # the support this training_step draws from
        self.stages.append(next(c for c in trainer.callbacks if isinstance(c, TimestepCurriculum)).stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.process.discrete:  # u = t/T: stage supports are t >= u_low T
            lowest = round(self.u_low * pl_module.process.num_timesteps)
        else:
            lowest = pl_module.timesteps.icdf(torch.tensor([self.u_low], dtype=torch.float64)).item() * (1 - 1e-5)
        self.violations += int((outputs["level"] < lowest).sum())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_switches_once_per_optimizer_step_and_draws_stay_in_the_stage(accumulate, capsys):
    cb = TimestepCurriculum(num_clusters=4, patience=2, smoothing=0.0, check_every_n_steps=1)
    probe = SupportProbe()
    trainer = quiet_trainer(max_steps=16, accumulate_grad_batches=accumulate, limit_val_batches=0,
                            log_every_n_steps=1, callbacks=[cb, probe])
    module = ScriptedModule()
    trainer.fit(module, _loader(16 * accumulate))
    # a constant loss switches every patience + 2 = 4 optimizer steps, whatever the accumulation
    assert [s["step"] for s in cb.switches] == [4, 8, 12] and [s["stage"] for s in cb.switches] == [2, 3, 4]
    assert cb.switches[0]["nimg"] == 4 * BATCH * accumulate
    assert probe.violations == 0 and probe.stages[-1] == 4
    assert module.timesteps.u_low == 0.0 and module.timesteps.u_high == 1.0  # the last stage: all timesteps
    assert float(trainer.callback_metrics["curriculum/stage"]) == 4.0
    assert capsys.readouterr().out.count("TimestepCurriculum") == 3  # one Rich line per switch


def test_checks_every_n_steps_switch_at_the_check_and_drop_old_stage_losses():
    cb = TimestepCurriculum(num_clusters=4, patience=2, smoothing=0.0, check_every_n_steps=3, verbose=False)
    quiet_trainer(max_steps=20, limit_val_batches=0, callbacks=[cb]).fit(ScriptedModule(), _loader())
    # The pacer decides at step 4, read at the check at step 6; steps 5-6 (old stage) are dropped,
    # so stage 2 counts from step 7 and decides at step 10, read at step 12; and so on.
    assert [s["step"] for s in cb.switches] == [6, 12, 18]


@pytest.mark.parametrize("pacing", ["fixed", "patience"])
def test_composes_with_min_snr_weighting_and_sigma_processes(pacing):
    kwargs = dict(steps_per_stage=3) if pacing == "fixed" else dict(patience=1, max_steps_per_stage=3)
    for module in (DiffusionLightningModule(tiny_unet(), optimizer=ADAM, weighting=MinSNRWeighting(gamma=5.0)),
                   DiffusionLightningModule(tiny_unet(), optimizer=ADAM, process=EDMProcess(), prediction="x0")):
        cb = TimestepCurriculum(num_clusters=3, pacing=pacing, check_every_n_steps=1, verbose=False, **kwargs)
        probe, weights = SupportProbe(), MinSNRCheck()
        quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=[cb, probe, weights]).fit(module, _loader())
        assert probe.violations == 0 and max(probe.stages) == 3
        if pacing == "fixed":
            assert [s["step"] for s in cb.switches] == [3, 6]
        if module.process.discrete:
            assert weights.checked == 8


class LossAwareCheck(pl.Callback):
    """Once warm, the loss-aware sampler puts no mass below the stage and its weights follow the restricted base."""

    def __init__(self):
        self.warm_steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sampler = pl_module.timesteps
        first = round(sampler.u_low * sampler.num_timesteps)
        assert float(sampler.p[:first].sum()) == 0.0
        torch.testing.assert_close((sampler.p * sampler.weights.double()).sum(), torch.tensor(1.0, dtype=torch.float64))
        self.warm_steps += int(bool(sampler.warm) and sampler.u_low > 0)  # warm inside a proper stage


def test_composes_with_the_loss_aware_sampler():
    from lightning_diffusion.callbacks import LossAwareTimestepSampling
    from lightning_diffusion.core.noise import VPProcess

    module = DiffusionLightningModule(tiny_unet(), optimizer=ADAM, process=VPProcess(num_timesteps=20))
    cb = TimestepCurriculum(num_clusters=4, pacing="fixed", steps_per_stage=4, verbose=False)
    probe, check = SupportProbe(), LossAwareCheck()
    quiet_trainer(max_steps=16, limit_val_batches=0, callbacks=[cb, LossAwareTimestepSampling(history=1), probe,
                                                                 check]).fit(module, _loader(64, 32))
    assert type(module.timesteps).__name__ == "LossAwareTimesteps"
    assert probe.violations == 0 and probe.stages == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert check.warm_steps >= 6  # the importance sampler was active inside stages 1-3


def test_composes_with_the_adaptive_sampler():
    """The learned policy's draws are mapped into the stage's support, and it keeps learning there."""
    from lightning_diffusion.callbacks import AdaptiveTimestepSampling
    from lightning_diffusion.core.noise import VPProcess

    module = DiffusionLightningModule(tiny_unet(), optimizer=ADAM, process=VPProcess(num_timesteps=100))
    cb = TimestepCurriculum(num_clusters=4, pacing="fixed", steps_per_stage=4, verbose=False)
    adaptive = AdaptiveTimestepSampling(update_every=2, subset_size=2, probe_grid=6, show_subset=False)
    probe = SupportProbe()
    quiet_trainer(max_steps=16, limit_val_batches=0,
                  callbacks=[cb, adaptive, probe]).fit(module, _loader(64, 16))
    assert type(module.timesteps).__name__ == "AdaptiveTimesteps"
    assert probe.violations == 0 and probe.stages == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert adaptive.updates == 8  # a policy update every 2 steps, in every stage


class MinSNRCheck(pl.Callback):
    """The reported per-sample loss is still min(SNR, gamma)/SNR * mse (eps-prediction) inside every stage."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not isinstance(pl_module.weighting, MinSNRWeighting):
            return
        weight = min_snr_weight(pl_module.process.snr(outputs["level"]), 5.0, "eps")
        torch.testing.assert_close(outputs["per_sample_loss"], weight * outputs["mse"])
        self.checked += 1


def _fit(tmp_path, name, max_steps, ckpt_path=None, probe=None):
    cb = TimestepCurriculum(num_clusters=6, patience=2, smoothing=0.5, check_every_n_steps=3, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, enable_checkpointing=True,
                            callbacks=[cb, ckpt] + ([probe] if probe else []))
    trainer.fit(ScriptedModule(script=wiggly_loss), _loader(), ckpt_path=ckpt_path)
    return cb


def test_resume_continues_in_the_saved_stage_with_identical_decisions(tmp_path):
    straight = _fit(tmp_path, "a", 28)
    steps = [s["step"] for s in straight.switches]
    assert any(s < 7 for s in steps) and any(s > 7 for s in steps)  # switches on both sides of the cut
    saved = torch.load(tmp_path / "a" / "step=7.ckpt", weights_only=True)  # plain state only
    state = saved["callbacks"]["TimestepCurriculum"]
    assert state["buffered_losses"].numel() == 1  # step 7 sits between checks at 6 and 9
    assert set(state["pacer"]) >= {"stage", "best", "wait", "smoothed"} and len(state["u_bounds"]) == 7
    probe = SupportProbe()
    resumed = _fit(tmp_path, "b", 28, ckpt_path=tmp_path / "a" / "step=7.ckpt", probe=probe)
    u_low, _ = stage_support(state["u_bounds"], state["pacer"]["stage"])
    assert state["pacer"]["stage"] > 1 and probe.stages[0] == state["pacer"]["stage"]
    assert resumed.switches == straight.switches
    assert repr(resumed.state_dict()) == repr(straight.state_dict())
    assert probe.violations == 0 and u_low > 0


class DumpSwitches(pl.Callback):
    """Each DDP rank writes the steps at which its curriculum switched (ddp_spawn: assert on files)."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, TimestepCurriculum))
        path = os.path.join(self.directory, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"switches": cb.switches, "u_low": pl_module.timesteps.u_low}, f)


@pytest.mark.timeout(120)
def test_ddp_ranks_with_different_losses_switch_at_the_same_step(tmp_path):
    cb = TimestepCurriculum(num_clusters=4, patience=2, smoothing=0.0, check_every_n_steps=1, verbose=False)
    trainer = quiet_trainer(max_steps=24, limit_val_batches=0, devices=2, strategy="ddp_spawn",
                            callbacks=[cb, DumpSwitches(str(tmp_path))])
    trainer.fit(ScriptedModule(), _loader(32))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = [[s["step"] for s in r["switches"]] for r in ranks]
    mean = [(scripted_loss(s, 0) + scripted_loss(s, 1)) / 2 for s in range(24)]
    assert steps[0] == steps[1] == expected_switches(mean, 4, 2) == [14, 18, 22]
    assert expected_switches([scripted_loss(s, 0) for s in range(24)], 4, 2) == [4, 8, 12]  # rank 0 alone
    assert ranks[0]["u_low"] == ranks[1]["u_low"] == 0.0


class Unrestrictable(TimestepDistribution):
    def sample(self, batch_size, device="cpu", generator=None, x0=None):
        return torch.randint(0, 1000, (batch_size,), device=device, generator=generator), torch.ones(batch_size)


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match=r"pacing='linear'"):
        TimestepCurriculum(pacing="linear")
    with pytest.raises(ValueError, match=r"num_clusters=0"):
        TimestepCurriculum(num_clusters=0)
    with pytest.raises(ValueError, match=r"patience=0"):
        TimestepCurriculum(patience=0)
    with pytest.raises(ValueError, match=r"steps_per_stage must be set"):
        TimestepCurriculum(pacing="fixed")
    with pytest.raises(ValueError, match=r"check_every_n_steps=0"):
        TimestepCurriculum(check_every_n_steps=0)
    with pytest.raises(ValueError, match=r"num_clusters=2000 must be <= the process's 1000 timesteps"):
        quiet_trainer(max_steps=1, callbacks=[TimestepCurriculum(num_clusters=2000)]).fit(ScriptedModule(), _loader())
    module = DiffusionLightningModule(tiny_unet(), timesteps=Unrestrictable())
    with pytest.raises(ValueError, match=r"Unrestrictable has none"):
        quiet_trainer(max_steps=1, callbacks=[TimestepCurriculum()]).fit(module, _loader())


def test_config_recipe_runs_the_curriculum(tmp_path, monkeypatch):
    import csv
    from pathlib import Path

    from lightning_diffusion.cli import DiffusionCLI

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "curriculum.yaml"
    cli = DiffusionCLI(args=[
        "fit", "--config", str(config), "--model.init_args.net.init_args.model_channels=16",
        "--model.init_args.net.init_args.attention_resolutions=[]", "--model.init_args.fd_samples=0",
        "--data.init_args.batch_size=16", "--trainer.max_steps=20", "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=5", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks.init_args.max_steps_per_stage=3", "--trainer.callbacks.init_args.check_every_n_steps=1",
    ])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, TimestepCurriculum))
    assert cb.num_clusters == 10 and [s["step"] for s in cb.switches] == [3, 6, 9, 12, 15, 18]
    assert cli.model.timesteps.u_low == pytest.approx(0.3)  # stage 7 of 10: t >= 300
    with open(Path(cli.trainer.log_dir) / "metrics.csv") as f:
        stages = [float(r["curriculum/stage"]) for r in csv.DictReader(f) if r.get("curriculum/stage")]
    assert stages == [2.0, 4.0, 6.0, 7.0]  # logged at steps 5, 10, 15, 20 (after that step's switch)
