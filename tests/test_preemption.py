"""Preemption: SIGUSR1 or SIGTERM to a running ``lightning-diffusion fit`` saves a checkpoint of the
step it reached and exits with status 0 (no SLURM needed); ``--ckpt_path`` continues from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import tiny_args

from lightning_diffusion.callbacks import PreemptionCheckpoint
from lightning_diffusion.cli import DiffusionCLI

MANY_STEPS = 100_000


def long_run_args(root: Path) -> list[str]:
    """The tiny quickstart with far more steps than the test waits for; a checkpoint every 3 steps."""
    return [*tiny_args(root, steps=MANY_STEPS), "--model.init_args.fd_samples=0",
            "--trainer.val_check_interval=50000", "--trainer.enable_model_summary=false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1"]


def _signal_after_a_few_steps(cmd: list[str], root: Path, signum: int) -> tuple[subprocess.CompletedProcess, Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    process = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(root.glob("lightning_logs/version_0/checkpoints/*step=3.ckpt")):  # 3 steps trained
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 3 within 240 s"
            time.sleep(0.2)
        process.send_signal(signum)  # to rank 0 only (the process we started)
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(cmd, process.returncode, output), root / "lightning_logs" / "version_0"


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=["SIGUSR1", "SIGTERM", "Ctrl-C"])
def test_signal_saves_the_step_reached_and_resume_continues(tmp_path, signum):
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", *long_run_args(tmp_path)]
    result, log_dir = _signal_after_a_few_steps(cmd, tmp_path, signum)
    assert result.returncode == 0, result.stdout[-3000:]
    saved = list(log_dir.glob("checkpoints/preempted-step=*.ckpt"))
    assert len(saved) == 1, result.stdout[-3000:]
    step = int(saved[0].stem.split("=")[1])
    assert 3 <= step < MANY_STEPS
    assert f"resume with --ckpt_path={saved[0]}" in result.stdout
    checkpoint = torch.load(saved[0], weights_only=True)
    assert checkpoint["global_step"] == step and checkpoint["diffusion"]["draws"] == step
    assert (log_dir / "config.yaml").is_file()
    # last.ckpt holds the same step: a hard link to the preemption checkpoint, not a second write.
    assert (log_dir / "checkpoints" / "last.ckpt").samefile(saved[0])

    sigint_before = signal.getsignal(signal.SIGINT)  # pytest's, or SIG_IGN when started in the background
    resumed = DiffusionCLI(args=["fit", *long_run_args(tmp_path), f"--trainer.max_steps={step + 2}",
                                 f"--ckpt_path={saved[0]}"])
    assert resumed.trainer.global_step == step + 2
    assert resumed.model.draws == step + 2  # the noise streams continue too
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored after fit
    assert signal.getsignal(signal.SIGINT) is sigint_before


def test_ddp_both_ranks_stop_at_the_same_step(tmp_path):
    # SIGUSR1 reaches rank 0 only; the all-reduced flag stops rank 1 at the same step, rank 0 writes.
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", *long_run_args(tmp_path),
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    result, log_dir = _signal_after_a_few_steps(cmd, tmp_path, signal.SIGUSR1)
    assert result.returncode == 0, result.stdout[-3000:]
    saved = list(log_dir.glob("checkpoints/preempted-step=*.ckpt"))
    assert len(saved) == 1, result.stdout[-3000:]
    step = int(saved[0].stem.split("=")[1])
    checkpoint = torch.load(saved[0], weights_only=True)
    assert checkpoint["global_step"] == step and checkpoint["diffusion"]["draws"] == step
    assert len(list(tmp_path.glob("lightning_logs/*"))) == 1


def test_fsdp2_ranks_stop_together_and_last_ckpt_links_the_sharded_folder(tmp_path):
    # FSDP2 (docs/sharding.md): checkpoints are folders, one file per rank; last.ckpt becomes a folder of
    # hard links to the preemption checkpoint's files, not a second write.
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", *long_run_args(tmp_path),
           "--config", str(Path(__file__).resolve().parents[1] / "configs" / "trainer" / "cpu_fsdp.yaml")]
    result, log_dir = _signal_after_a_few_steps(cmd, tmp_path, signal.SIGUSR1)
    assert result.returncode == 0, result.stdout[-3000:]
    saved = list(log_dir.glob("checkpoints/preempted-step=*.ckpt"))
    assert len(saved) == 1 and saved[0].is_dir(), result.stdout[-3000:]
    step = int(saved[0].stem.split("=")[1])
    assert sorted(p.name for p in saved[0].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(saved[0] / "meta.pt", weights_only=True)["global_step"] == step
    last = log_dir / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == sorted(p.name for p in saved[0].iterdir())
    assert all((last / p.name).samefile(p) for p in saved[0].iterdir())
    assert not [p for p in last.parent.iterdir() if ".tmp-" in p.name]  # no temporary folder left


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"PreemptionCheckpoint.signals: 'SIGNOPE' is not a signal here"):
        PreemptionCheckpoint(signals=("SIGNOPE",))
    with pytest.raises(ValueError, match=r"PreemptionCheckpoint.check_every_n_steps=0 must be >= 1."):
        PreemptionCheckpoint(check_every_n_steps=0)
