"""Shared fixtures: a tiny UNet and the embedded digits, sized for a 2-core CPU."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest

from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.networks import UNet


def tiny_unet(num_classes: int = 0, channels: int = 1, image_size: int = 8) -> UNet:
    """About 0.1M parameters: fast enough for a few hundred CPU steps in a test."""
    return UNet(in_channels=channels, image_size=image_size, model_channels=16, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(), num_classes=num_classes)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A Trainer without progress bars, summaries or loggers unless asked for."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


@pytest.fixture(autouse=True)
def _no_master_port(monkeypatch):
    # In-process ddp_spawn leaves MASTER_PORT behind; later subprocess runs must pick a free one.
    monkeypatch.delenv("MASTER_PORT", raising=False)
    yield
    os.environ.pop("MASTER_PORT", None)
