"""The callbacks in a LightningModule that is not ours: examples/plain_ddpm.py (docs/callbacks.md).

Each callback must do its job there (EMA profiles exact, the sampler learned and used, the
curriculum advanced and obeyed), under 2-rank CPU DDP too, resume exactly after a kill, and a
half-right integration must stop with one sentence.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_layout_change import Trajectory, hand_ema

from conftest import quiet_trainer
from lightning_diffusion.callbacks import (AdaptiveTimestepSampling, LossAwareTimestepSampling, PostHocEMA,
                                           TimestepCurriculum)
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.protocol import step_output
from lightning_diffusion.timesteps import TimestepPolicy

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_ddpm.py"
_spec = importlib.util.spec_from_file_location("plain_ddpm", EXAMPLE)
plain_ddpm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plain_ddpm)
PlainDDPM = plain_ddpm.PlainDDPM
BATCH = 32


class Recorder(pl.Callback):
    """Per micro-batch: the stage before it, the levels, weights, per-sample losses and loss it returned."""

    def __init__(self, curriculum: TimestepCurriculum | None = None) -> None:
        self.curriculum, self.rows, self._stage = curriculum, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stage = self.curriculum.pacer.stage if self.curriculum is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        drawn = pl_module.timesteps.last_level
        self.rows.append({"stage": self._stage, "level": outputs["level"].clone(), "drawn": drawn.clone(),
                          "weight": outputs["importance_weight"].clone(), "loss": outputs["loss"].detach().clone(),
                          "per_sample": outputs["per_sample_loss"].clone()})


def _fit(module, callbacks, steps, **kwargs):
    pl.seed_everything(0)
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(module, DigitsDataModule(batch_size=BATCH))
    return trainer


def _curriculum():
    return TimestepCurriculum(num_clusters=4, patience=3, max_steps_per_stage=6, check_every_n_steps=2, verbose=False)


def test_every_callback_does_its_job_in_a_plain_module(tmp_path):
    sampler, curriculum = LossAwareTimestepSampling(history=1), _curriculum()
    ema, trajectory, recorder = PostHocEMA((0.05, 0.10)), Trajectory(str(tmp_path / "w.pt")), Recorder(curriculum)
    module = PlainDDPM(num_timesteps=100)
    _fit(module, [sampler, curriculum, ema, trajectory, recorder], steps=40)
    # Post-hoc EMA: exact against a hand-tracked power-function EMA over 32 images per step.
    nimg = [BATCH * (k + 1) for k in range(40)]
    for sigma_rel, averages in zip((0.05, 0.10), ema.ema.averages):
        expected = hand_ema(nimg, trajectory.weights, sigma_rel)
        for name, average in zip(ema.ema.param_names, averages):
            torch.testing.assert_close(average.double(), expected["net." + name], rtol=1e-5, atol=1e-6)
    # The loss-aware sampler learned (warm, non-uniform) and the module trained on its draws and weights.
    assert module.timesteps is sampler.sampler and bool(sampler.sampler.warm)
    used = [r for r in recorder.rows if float((r["weight"] - 1).abs().max()) > 1e-3]
    assert len(used) >= 5
    for row in recorder.rows:
        assert torch.equal(row["level"], row["drawn"])
        torch.testing.assert_close(row["loss"], (row["weight"] * row["per_sample"]).mean())
    # The curriculum advanced, and every batch of a stage lay in that stage's clusters.
    assert [s["stage"] for s in curriculum.switches][:3] == [2, 3, 4]
    for row in recorder.rows:
        if row["stage"] < 4 and row["stage"] is not None:
            edge = curriculum.level_bounds[4 - row["stage"]]
            assert int(row["level"].min()) >= edge, (row["stage"], int(row["level"].min()), edge)


def test_the_adaptive_sampler_learns_in_a_plain_module():
    sampler = AdaptiveTimestepSampling(update_every=2, probe_grid=8, show_subset=False, seed=3)
    recorder = Recorder(None)
    module = PlainDDPM(num_timesteps=100)
    _fit(module, [sampler, recorder], steps=12)
    assert sampler.updates == 6
    torch.manual_seed(3)
    initial = TimestepPolicy(1, sampler.policy_channels)
    changed = [not torch.equal(a, b) for a, b in zip(initial.state_dict().values(),
                                                     sampler.sampler.policy.state_dict().values())]
    assert any(changed)  # REINFORCE moved the policy
    assert all(torch.equal(r["level"], r["drawn"]) for r in recorder.rows)


# ---------------------------------------------------------------------- half-right integrations
class NeverDraws(PlainDDPM):
    def training_step(self, batch, batch_idx):
        x0, labels = batch
        t = torch.randint(0, self.hparams.num_timesteps, (len(x0),), device=x0.device)
        per_sample = self.loss_at(x0, torch.randn_like(x0), t, labels)
        return step_output(per_sample.mean(), per_sample, t, torch.ones_like(per_sample))


class DrawsItsOwnLevels(NeverDraws):
    def training_step(self, batch, batch_idx):
        self.timesteps.sample(len(batch[0]), batch[0].device, x0=batch[0], labels=batch[1])  # drawn, then ignored
        return super().training_step(batch, batch_idx)


class DropsTheWeights(PlainDDPM):
    def training_step(self, batch, batch_idx):
        x0, labels = batch
        t, w = self.timesteps.sample(len(x0), x0.device, x0=x0, labels=labels)
        per_sample = self.loss_at(x0, torch.randn_like(x0), t, labels)
        return step_output(per_sample.mean(), per_sample, t, w)  # forgot the importance weights


class ReturnsOnlyTheLoss(PlainDDPM):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


class NoTimesteps(PlainDDPM):
    def __init__(self):
        super().__init__(num_timesteps=100)
        del self.timesteps


@pytest.mark.parametrize("module, callback, sentence", [
    (NeverDraws, LossAwareTimestepSampling, r"training_step did not draw its levels from module.timesteps"),
    (DrawsItsOwnLevels, LossAwareTimestepSampling, r"levels training_step returned are not the ones"),
    (DrawsItsOwnLevels, _curriculum, r"stage 1/4 allows t in \[75, 99\], but the module trained on level"),
    (ReturnsOnlyTheLoss, _curriculum, r"training_step must return a dict with `per_sample_loss`, `level`"),
    (NoTimesteps, LossAwareTimestepSampling, r"LossAwareTimestepSampling needs the module's `timesteps`: give "
                                             r"NoTimesteps a `timesteps` attribute"),
], ids=["never-draws", "ignores-the-draw", "curriculum-disobeyed", "no-dict", "no-timesteps"])
def test_a_half_right_integration_is_one_sentence(module, callback, sentence):
    instance = module() if module is NoTimesteps else module(num_timesteps=100)
    with pytest.raises(ValueError, match=sentence) as error:
        _fit(instance, [callback()], steps=5)
    assert "\n" not in str(error.value)


def test_dropped_importance_weights_are_caught_once_the_sampler_is_warm():
    with pytest.raises(ValueError, match=r"the importance weights must be applied"):
        _fit(DropsTheWeights(num_timesteps=100), [LossAwareTimestepSampling(history=1)], steps=60)


def test_adaptive_sampler_names_the_missing_lookahead_loss():
    class NoLookahead(PlainDDPM):
        lookahead_loss = None

    with pytest.raises(ValueError, match=r"AdaptiveTimestepSampling needs the module's `lookahead_loss`: give "
                                         r"NoLookahead a method lookahead_loss\(x0, noise, level, labels\)"):
        _fit(NoLookahead(num_timesteps=100), [AdaptiveTimestepSampling()], steps=2)


# ---------------------------------------------------------------------- DDP, kill and resume
def _run(root: Path, steps: int, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    cmd = [sys.executable, str(EXAMPLE), "--devices", "2", "--max_steps", str(steps), "--root", str(root),
           "--checkpoint_every", "4", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen) -> None:
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]


def _state(root: Path) -> dict:
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    callbacks = checkpoint["callbacks"]
    return {"weights": checkpoint["state_dict"], "optimizer": checkpoint["optimizer_states"][0]["state"],
            "ema": callbacks["PostHocEMA"]["ema"]["averages"], "sampler": callbacks["LossAwareTimestepSampling"],
            "stage": callbacks["TimestepCurriculum"]["pacer"], "clock": callbacks["ImageClock"],
            "step": checkpoint["global_step"]}


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), (path, a, b)  # nan == nan for the pacer's smoothed loss


@pytest.mark.slow
def test_two_ddp_ranks_killed_and_resumed_end_exactly_as_an_uninterrupted_run(tmp_path):
    _finish(_run(tmp_path / "straight", 24))
    killed = _run(tmp_path / "killed", 24)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not (last.exists() and torch.load(last, weights_only=True)["global_step"] >= 8):
        assert killed.poll() is None and time.monotonic() < deadline, "no checkpoint of step 8"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # both ranks, mid-run
    killed.communicate()
    assert torch.load(last, weights_only=True)["global_step"] < 24  # the resume below has work to do
    _finish(_run(tmp_path / "killed", 24, "--ckpt_path", str(last)))
    straight, resumed = _state(tmp_path / "straight"), _state(tmp_path / "killed")
    assert straight["step"] == 24 and straight["clock"]["nimg"] == 24 * BATCH * 2  # both ranks counted
    assert straight["stage"]["stage"] > 1 and bool(straight["sampler"]["timesteps"]["count"].sum() > 0)
    _assert_same(straight, resumed)
