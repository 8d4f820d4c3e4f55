"""docs/architecture.md "Nothing lost": checkpoints and EMA snapshots are never half-written.

``AtomicCheckpointIO`` (the CLI's default) writes ``.<name>.tmp-<pid>``, fsyncs and renames it: a
save that fails mid-write leaves the previous file byte-identical, and a run killed with SIGKILL
leaves only loadable ``.ckpt`` and snapshot files. A temp file a killed process left behind is
never named like a checkpoint, and the next atomic write to its folder removes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.demos.boring_classes import BoringModel
from test_cli import tiny_args

from lightning_diffusion import phema_tool
from lightning_diffusion.checkpoint_io import AtomicCheckpointIO
from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.ema.snapshots import load_manifest, load_snapshot

MANY_STEPS = 100_000


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_save_failing_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                         default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def fail(obj, f, *args, **kwargs):
        f.write(b"\x80partial checkpoint bytes" * 100)
        raise error("interrupted mid-write")
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(error, match="mid-write"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file behind
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 2


def test_the_cli_uses_it_unless_another_checkpoint_io_is_configured(tmp_path):
    args = [*tiny_args(tmp_path, steps=2), "--model.init_args.fd_samples=0"]
    assert isinstance(DiffusionCLI(args=args, run=False).trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    chosen = DiffusionCLI(args=[*args, "--trainer.plugins=lightning.fabric.plugins.TorchCheckpointIO"], run=False)
    assert type(chosen.trainer.strategy.checkpoint_io) is TorchCheckpointIO


def _kill_while_writing(cmd: list[str], root: Path) -> int:
    """Start ``cmd``; once 6 step checkpoints and 3 snapshot pairs exist, SIGKILL it, mid-write if we can see one."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    process = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt_dir, phema_dir = root / "lightning_logs/version_0/checkpoints", root / "lightning_logs/version_0/phema"
    try:
        deadline = time.monotonic() + 240
        while len(list(ckpt_dir.glob("*step=*.ckpt"))) < 6 or len(load_manifest(phema_dir)) < 6:
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no 6 checkpoints within 240 s"
            time.sleep(0.05)
        until = time.monotonic() + 5
        while time.monotonic() < until:  # kill while a temp file is on disk, i.e. mid-write (always so here)
            if any(".tmp-" in e.name for d in (ckpt_dir, phema_dir) for e in os.scandir(d)):
                break
        process.kill()
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process.pid


@pytest.mark.timeout(300)
def test_sigkill_leaves_only_loadable_checkpoints_and_snapshots(tmp_path):
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", *tiny_args(tmp_path, steps=MANY_STEPS),
           "--model.init_args.fd_samples=0", "--trainer.val_check_interval=50000",
           "--trainer.enable_model_summary=false",
           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
           "--trainer.callbacks.save_last=true",
           "--trainer.callbacks+=lightning_diffusion.callbacks.PostHocEMA",
           "--trainer.callbacks.snapshot_every_nimg=64"]  # a snapshot pair every 2 steps of batch 32
    pid = _kill_while_writing(cmd, tmp_path)
    log_dir = tmp_path / "lightning_logs" / "version_0"
    ckpt_dir, phema_dir = log_dir / "checkpoints", log_dir / "phema"

    checkpoints = sorted(ckpt_dir.glob("*.ckpt"))
    assert len(checkpoints) >= 7 and ckpt_dir / "last.ckpt" in checkpoints
    for path in checkpoints:
        assert ".tmp" not in path.name
        assert torch.load(path, weights_only=True)["global_step"] >= 1
    leftovers = [p for d in (ckpt_dir, phema_dir) for p in d.iterdir() if ".tmp-" in p.name]
    assert all(p.name.startswith(".") and p.name.endswith(f".tmp-{pid}") for p in leftovers)

    manifest = load_manifest(phema_dir)
    assert len(manifest) >= 6
    for entry in manifest:
        assert load_snapshot(phema_dir / entry["file"])["nimg"] == entry["nimg"]
    out = tmp_path / "rebuilt"
    phema_tool.main(["rebuild", str(log_dir), "--sigma_rel", "0.07", "--out", str(out)])
    (rebuilt,) = out.glob("*.ckpt")
    assert torch.load(rebuilt, weights_only=True)["phema"]["sigma_rel"] == 0.07

    # Temp files of the killed process (one planted, in case the kill landed between writes) go at
    # the next atomic write to their folder; a live process's temp file stays.
    stale, live = ckpt_dir / f".epoch=0-step=3.ckpt.tmp-{pid}", ckpt_dir / f".other.ckpt.tmp-{os.getpid()}"
    stale.write_bytes(b"half"), live.write_bytes(b"in flight")
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    AtomicCheckpointIO().save_checkpoint(last, ckpt_dir / "last.ckpt")
    assert [p.name for p in ckpt_dir.iterdir() if ".tmp-" in p.name] == [live.name]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == last["global_step"]
