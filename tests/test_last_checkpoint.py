"""Every fit leaves ``last.ckpt``; long runs save it on a step or time interval, independent of validation."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_cli import tiny_args

from conftest import quiet_trainer, tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import LastCheckpoint, PostHocEMA
from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.data import DigitsDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_short_cli_fit_leaves_last_ckpt_that_validate_reads(tmp_path, monkeypatch):
    # 12 steps, validation every 50000: Lightning's ModelCheckpoint alone wrote nothing here.
    monkeypatch.chdir(tmp_path)
    args = [*tiny_args(tmp_path, steps=12), "--trainer.val_check_interval=50000", "--model.init_args.fd_samples=0"]
    cli = DiffusionCLI(args=["fit", *args])
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temp file left
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 12 and checkpoint["callbacks"]["ImageClock"]["nimg"] == 12 * 32
    val = DiffusionCLI(args=["validate", *args, f"--ckpt_path={last}"])
    assert math.isfinite(float(val.trainer.callback_metrics["val/loss"]))


class _SavedSteps(pl.Callback):
    """The step held by last.ckpt at the start of each batch (LastCheckpoint saved after the previous one)."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.path.exists():
            self.seen.append(torch.load(self.path, weights_only=True)["global_step"])


def _fit(tmp_path: Path, steps: int, callbacks: list, ckpt: str | None = None, **kwargs) -> DiffusionLightningModule:
    pl.seed_everything(0)
    module = DiffusionLightningModule(tiny_unet(), optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, enable_checkpointing=True, callbacks=callbacks,
                            **kwargs)
    trainer.fit(module, DigitsDataModule(batch_size=16), ckpt_path=ckpt)
    return module


@pytest.mark.parametrize("kwargs, expected", [
    (dict(every_n_steps=3, every_minutes=None), [3, 3, 3, 6]),  # seen before steps 4-7; 7 at the end
    (dict(every_n_steps=None, every_minutes=1e-9), [1, 2, 3, 4, 5, 6]),  # time is always up: every step
    (dict(every_n_steps=None, every_minutes=None), []),  # only at the end
], ids=["every-3-steps", "time-interval", "end-only"])
def test_saves_on_its_interval_and_at_the_end(tmp_path, kwargs, expected):
    last = tmp_path / "last.ckpt"
    probe = _SavedSteps(last)
    _fit(tmp_path, 7, [LastCheckpoint(dirpath=str(tmp_path), **kwargs), probe])
    assert probe.seen == expected
    assert torch.load(last, weights_only=True)["global_step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resume_from_last_ckpt_is_exact(tmp_path):
    ema_a, ema_b = PostHocEMA((0.05, 0.10)), PostHocEMA((0.05, 0.10))
    reference = _fit(tmp_path / "a", 9, [ema_a, LastCheckpoint(dirpath=str(tmp_path / "a"))])
    _fit(tmp_path / "b", 5, [PostHocEMA((0.05, 0.10)), LastCheckpoint(dirpath=str(tmp_path / "b"))])
    resumed = _fit(tmp_path / "b", 9, [ema_b, LastCheckpoint(dirpath=str(tmp_path / "b"))],
                   ckpt=str(tmp_path / "b" / "last.ckpt"))
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(ema_a.ema.averages, ema_b.ema.averages):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert ema_a.ema.nimg == ema_b.ema.nimg == 9 * 16


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"LastCheckpoint.every_n_steps=0 must be >= 1 or None."):
        LastCheckpoint(every_n_steps=0)
    with pytest.raises(ValueError, match=r"LastCheckpoint.every_minutes=0 must be > 0 or None."):
        LastCheckpoint(every_minutes=0)
