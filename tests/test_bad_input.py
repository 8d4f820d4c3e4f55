"""Wrong settings, one row each: the real CLI stops before training with one sentence naming the
setting (exit status 2, nothing written), or the Python API raises that sentence from setup.

Also here: resuming from a checkpoint of another model (one sentence, exit status 2) and a diverging
run (exit status 1, one sentence naming the optimizer step and the last good checkpoint; no
checkpoint of nan weights is ever written, one process or two DDP ranks).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import quiet_trainer, tiny_unet
from lightning.pytorch.callbacks import ModelCheckpoint
from test_cli import tiny_args

from lightning_diffusion import DiffusionLightningModule, NonFiniteLossError
from lightning_diffusion.callbacks import PostHocEMA, TimestepCurriculum
from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.core.targets import StableTargetField
from lightning_diffusion.core.weighting import MinSNRWeighting
from lightning_diffusion.data import ArrayDataModule, CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from lightning_diffusion.networks import UNet

CALLBACKS = "--trainer.callbacks+=lightning_diffusion.callbacks."


def tree(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(root: Path, extra: list[str], capsys) -> tuple[int, str]:
    """A 2-step quickstart through the real CLI; returns (exit status, the one `error:` line)."""
    with pytest.raises(SystemExit) as exit_info:
        DiffusionCLI(args=["fit", *tiny_args(root, steps=2), "--model.init_args.fd_samples=0", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return exit_info.value.code, lines[0]


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> Path:
    """A 1-step checkpoint of the tiny quickstart on 8x8 digits, written by the CLI."""
    root = tmp_path_factory.mktemp("small")
    cli = DiffusionCLI(args=["fit", *tiny_args(root, steps=2), "--model.init_args.fd_samples=0",
                             "--trainer.max_steps=1",
                             "--model.init_args.net.init_args.attention_resolutions=[4]"])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def _npz(tmp_path: Path, shape: tuple[int, ...]) -> str:
    path = tmp_path / "images.npz"
    np.savez(path, images=np.zeros(shape, dtype=np.uint8))
    return str(path)


# (id, CLI overrides (a function of tmp_path), fragments the one error line must hold)
CLI_CASES = [
    ("phema_sigma_rel_too_wide", lambda p: [CALLBACKS + "PostHocEMA", "--trainer.callbacks.sigma_rels=[0.3]"],
     ["PostHocEMA.sigma_rels=0.3", "0.2887"]),
    ("phema_sigma_rel_zero", lambda p: [CALLBACKS + "PostHocEMA", "--trainer.callbacks.sigma_rels=[0.0]"],
     ["PostHocEMA.sigma_rels=0.0", "0 < PostHocEMA.sigma_rels"]),
    ("min_snr_gamma_negative", lambda p: ["--model.init_args.weighting.init_args.gamma=-1"],
     ["MinSNRWeighting.gamma=-1.0", "must be > 0"]),
    ("curriculum_more_clusters_than_timesteps",
     lambda p: [CALLBACKS + "TimestepCurriculum", "--trainer.callbacks.num_clusters=2000"],
     ["TimestepCurriculum.num_clusters=2000", "<= the process's 1000 timesteps"]),
    ("stf_reference_size_below_batch",
     lambda p: ["--model.init_args.target=lightning_diffusion.core.targets.StableTargetField",
                "--model.init_args.target.reference_size=8"],
     ["StableTargetField.reference_size=8", ">= the per-device batch size 32"]),
    ("image_size_the_unet_cannot_take", lambda p: ["--data.init_args.image_size=7"],
     ["UNet.image_size=7 is not divisible", "use a multiple of 2"]),
    ("npz_array_of_wrong_shape",
     lambda p: ["--data=lightning_diffusion.data.ArrayDataModule", f"--data.path={_npz(p, (10, 2, 3, 8, 8))}",
                "--data.labels_key=null"],
     ["ArrayDataModule.path", "images have shape (10, 2, 3, 8, 8)", "[N,C,H,W]"]),
    ("unknown_prediction", lambda p: ["--model.init_args.prediction=score"],
     ["prediction='score' is not supported", "use one of ('eps', 'x0', 'v', 'flow')"]),
    ("missing_image_folder",
     lambda p: ["--data=lightning_diffusion.data.ImageFolderDataModule", "--data.path=/no/such"],
     ["ImageFolderDataModule.path: '/no/such' is not an existing folder"]),
    ("missing_array_file", lambda p: ["--data=lightning_diffusion.data.ArrayDataModule", "--data.path=/no/x.npz"],
     ["ArrayDataModule.path: '/no/x.npz' does not exist", "give a .npy or .npz file"]),
    ("missing_cifar_folder", lambda p: ["--data=lightning_diffusion.data.CIFAR10DataModule", "--data.path=/no/such"],
     ["CIFAR10DataModule.path: '/no/such' does not exist", "cifar-10-batches-py"]),
]


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_before_training(tmp_path, capsys, overrides, fragments):
    root = tmp_path / "run"
    code, line = run_cli(root, overrides(tmp_path), capsys)
    assert code == 2
    assert all(f in line for f in fragments), line
    assert line.count(". ") == 0, line  # one sentence
    assert not root.exists() or tree(root) == {}  # no config, log, checkpoint or sample written


@pytest.mark.parametrize("overrides, named", [
    # the data's shape, linked into the net: at 16x16 the UNet has no attention at resolution 4
    (["--model.init_args.net.init_args.attention_resolutions=[4]", "--data.init_args.image_size=16"],
     "net.init_args.image_size=8 in the checkpoint but 16 now"),
    # a model setting: LightningCLI alone would silently build the checkpoint's net instead
    (["--model.init_args.net.init_args.attention_resolutions=[4]", "--model.init_args.net.init_args.model_channels=32"],
     "net.init_args.model_channels=16 in the checkpoint but 32 now"),
], ids=["data_shape", "model_setting"])
def test_resume_from_a_checkpoint_of_another_config(tmp_path, capsys, cli_checkpoint, overrides, named):
    before = tree(cli_checkpoint.parents[3])
    code, line = run_cli(tmp_path / "run", [*overrides, f"--ckpt_path={cli_checkpoint}"], capsys)
    assert code == 2
    assert line.startswith("error: --ckpt_path: the checkpoint does not match the model (")
    assert named in line and line.count(". ") == 0, line
    assert not (tmp_path / "run").exists() or tree(tmp_path / "run") == {}
    assert tree(cli_checkpoint.parents[3]) == before


def test_resume_python_checkpoint_of_another_net_names_the_tensor(tmp_path):
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(DiffusionLightningModule(tiny_unet()), datamodule=DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(tmp_path / "small.ckpt")
    wider = UNet(in_channels=1, image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=())
    with pytest.raises(ValueError) as error:
        _fit(DiffusionLightningModule(wider), DigitsDataModule(batch_size=16), max_steps=2,
             ckpt_path=tmp_path / "small.ckpt")
    assert re.fullmatch(r"--ckpt_path: the checkpoint does not match the model \(tensor 'net\.[\w.]+' has shape "
                        r"\[16(, \d+)*\] in the checkpoint but \[32(, \d+)*\] here\); resume with the checkpoint's "
                        r"settings or start a new run without ckpt_path\.", str(error.value)), str(error.value)


def test_diverging_run_stops_naming_the_step(tmp_path, capsys):
    # Validation and a checkpoint after every step; SGD with lr=1e12 overflows within a few steps.
    code, line = run_cli(tmp_path, ["--model.init_args.optimizer=torch.optim.SGD",
                                    "--model.init_args.optimizer.lr=1e12", "--trainer.max_steps=20",
                                    "--trainer.log_every_n_steps=1"], capsys)
    assert code == 1
    match = re.fullmatch(r"error: DiffusionLightningModule: the training loss or weights became non-finite "
                         r"\(nan/inf\) at optimizer step (\d+), so training stopped without saving it "
                         r"\(last good checkpoint: '(.+)'\); use a lower learning rate or gradient clipping "
                         r"\(trainer.gradient_clip_val\), or check_finite=false to train on\.", line)
    assert match, line
    step, last_good = int(match[1]), Path(match[2])
    assert 1 < step < 20 and last_good.is_file() and f"step={step - 1}.ckpt" in last_good.name
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == [last_good.name]
    state = torch.load(last_good, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ---------------------------------------------------------------- the Python API


def _fit(module: DiffusionLightningModule, data, ckpt_path=None, **trainer_kwargs) -> None:
    quiet_trainer(**{"max_steps": 1, **trainer_kwargs}).fit(module, datamodule=data, ckpt_path=ckpt_path)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PostHocEMA(sigma_rels=(0.2887,)), "PostHocEMA.sigma_rels=0.2887 is out of range"),
        (lambda: PostHocEMA(sigma_rels=(-0.1,)), "PostHocEMA.sigma_rels=-0.1 is out of range"),
        (lambda: MinSNRWeighting(gamma=0.0), "MinSNRWeighting.gamma=0.0 must be > 0"),
        (lambda: DiffusionLightningModule(tiny_unet(), prediction="score"), "prediction='score' is not supported"),
        (lambda: ImageFolderDataModule(path="/no/such"), "ImageFolderDataModule.path: '/no/such'"),
        (lambda: ArrayDataModule(path="/no/x.npy"), "ArrayDataModule.path: '/no/x.npy' does not exist"),
        (lambda: CIFAR10DataModule(path="/no/such"), "CIFAR10DataModule.path: '/no/such' does not exist"),
    ],
)
def test_constructors_refuse(build, message):
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        build()
    assert message in str(error.value)


def test_explicit_net_with_other_channels_is_refused_in_setup(tmp_path):
    module = DiffusionLightningModule(tiny_unet(channels=3))  # the digits have 1 channel
    with pytest.raises(ValueError) as error:
        _fit(module, DigitsDataModule(batch_size=16), default_root_dir=tmp_path)
    assert str(error.value) == ("UNet.in_channels=3 does not match DigitsDataModule.channels=1; use in_channels=1 "
                                "(the CLI links it from data.channels).")
    assert module.draws == 0  # no training step ran


def test_stf_and_curriculum_refuse_in_setup_before_a_step(tmp_path):
    stf = DiffusionLightningModule(tiny_unet(), target=StableTargetField(reference_size=8))
    with pytest.raises(ValueError, match=r"StableTargetField.reference_size=8 must be >= the per-device batch size 16"):
        _fit(stf, DigitsDataModule(batch_size=16), default_root_dir=tmp_path)
    curriculum = DiffusionLightningModule(tiny_unet())
    with pytest.raises(ValueError, match=r"TimestepCurriculum.num_clusters=1001 must be <= the process's 1000"):
        _fit(curriculum, DigitsDataModule(batch_size=16), callbacks=[TimestepCurriculum(num_clusters=1001)])
    assert stf.draws == 0 and curriculum.draws == 0


class _TreeRecorder(pl.Callback):
    """Hashes the checkpoint folder before every batch: what a crash could have changed since."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.before_last_batch = folder, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before_last_batch = tree(self.folder)


def test_diverging_lr_never_writes_a_nan_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"

    recorder = _TreeRecorder(folder)

    def run(lr: float, steps: int) -> None:
        module = DiffusionLightningModule(tiny_unet(), optimizer=functools.partial(torch.optim.SGD, lr=lr))
        saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
        _fit(module, DigitsDataModule(batch_size=16), max_steps=steps, enable_checkpointing=True,
             callbacks=[recorder, saver], log_every_n_steps=50)

    run(lr=1e-3, steps=2)  # a healthy run leaves two checkpoints
    healthy = tree(folder)
    assert len(healthy) == 2
    with pytest.raises(NonFiniteLossError) as error:
        run(lr=1e6, steps=30)
    match = re.fullmatch(r"DiffusionLightningModule: the training loss or weights became non-finite \(nan/inf\) at "
                         r"optimizer step (\d+), so training stopped .*\(last good checkpoint: (.+)\); use a lower .*",
                         str(error.value))
    assert match, str(error.value)
    step = int(match[1])
    assert 1 <= step < 30
    after = tree(folder)
    assert {k: after[k] for k in healthy} == healthy  # the earlier run's files: same bytes
    # Nothing was written after the last batch started, and every checkpoint the run wrote is finite.
    for name in set(after) - set(healthy):
        state = torch.load(folder / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name
        assert int(re.search(r"step=(\d+)", name)[1]) < step
    if set(after) == set(healthy):
        assert match[2] == "none saved yet"
    else:
        assert match[2].startswith("'") and Path(match[2].strip("'")).name in after
    assert recorder.before_last_batch == after


def test_diverging_ddp_run_stops_every_rank(tmp_path):
    # Two CPU ranks: both stop at the same step (all-reduced record), no rank hangs, nothing nan saved.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", *tiny_args(tmp_path, steps=2),
           "--model.init_args.fd_samples=0", "--model.init_args.optimizer=torch.optim.SGD",
           "--model.init_args.optimizer.lr=1e12", "--trainer.max_steps=20", "--trainer.log_every_n_steps=1",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines, result.stderr[-3000:]
    assert all("or weights became non-finite (nan/inf) at optimizer step" in line for line in lines), lines
    assert len(set(lines)) == 1  # every rank names the same step
    for path in tmp_path.rglob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
