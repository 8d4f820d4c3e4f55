"""Shared fixtures: a tiny UNet and the embedded digits, sized for a 2-core CPU."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest
import torch

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
def one_thread():
    """One intra-op thread for the test: on this shared 2-core machine a busy neighbour makes 2 threads
    spin (6 tiny steps took 19 s with 2 threads, 0.24 s with 1, measured); results do not depend on it.
    Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def assert_fit_lowers_val_loss(module, data, steps: int = 120, factor: float = 0.6) -> None:
    """Validate, train ``steps`` steps, validate again: the validation loss must fall below ``factor`` x before."""
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=2)
    before = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    assert after < factor * before, (before, after)


@pytest.fixture
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64)


@pytest.fixture(autouse=True)
def _no_master_port(monkeypatch):
    # In-process ddp_spawn leaves MASTER_PORT behind; later subprocess runs must pick a free one.
    monkeypatch.delenv("MASTER_PORT", raising=False)
    yield
    os.environ.pop("MASTER_PORT", None)


class _EndSession:
    """The SIGINT/SIGTERM handler while a test runs: note the signal, stop the test with KeyboardInterrupt."""

    def __init__(self, received: list[int]) -> None:
        self.received = received

    def __call__(self, signum: int, frame) -> None:
        self.received.append(signum)
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} during a test")


@pytest.fixture(autouse=True)
def _signals_end_the_session(monkeypatch, request):
    """Ctrl-C or SIGTERM while a test runs ends the whole session, even mid-fit.

    During an in-process fit, PreemptionCheckpoint (and Lightning's SIGTERM handler) turn these
    signals into "save at the next step, exit 0", which ended only the running test, and Lightning
    answers a KeyboardInterrupt by ignoring SIGINT for good (trainer/call.py): pytest could then be
    stopped only by SIGKILL. Here every SIGINT/SIGTERM handler a test installs is replaced by one
    that raises KeyboardInterrupt (reinstalling pytest's own handler is let through, so code that
    restores SIGINT's sees it restored), and so is SIGTERM's default; after the test the handlers are
    restored and, if such a signal arrived, the session ends (exit status 2, pytest's "interrupted").
    A Ctrl-C outside a fit is pytest's usual KeyboardInterrupt. Tests of signal handling
    therefore send signals to a CLI subprocess, never to the pytest process.
    """
    original = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    received: list[int] = []
    install = signal.signal

    def guarded(signum, handler):
        if signum in original and (signum == signal.SIGTERM or handler is not original[signum]) \
                and not isinstance(handler, _EndSession):
            handler = _EndSession(received)
        return install(signum, handler)

    monkeypatch.setattr(signal, "signal", guarded)
    guarded(signal.SIGTERM, signal.SIG_DFL)  # not killed outright either: pytest reports and cleans up
    yield
    monkeypatch.setattr(signal, "signal", install)
    for signum, handler in original.items():
        install(signum, handler)
    if received:
        names = " and ".join(sorted({signal.Signals(s).name for s in received}))
        pytest.exit(f"{names} during {request.node.nodeid}: stopping the session",
                    returncode=pytest.ExitCode.INTERRUPTED)
