"""The command line as a user runs it: fit -> validate -> predict, --print_config, DDP, bad input."""

from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_diffusion.cli import DiffusionCLI

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def tiny_args(root: Path, steps: int = 20) -> list[str]:
    """The quickstart recipe shrunk to seconds: small UNet, few steps, small FD."""
    return [
        "--config", QUICKSTART,
        "--model.init_args.net.init_args.model_channels=16",
        "--model.init_args.net.init_args.attention_resolutions=[]",
        "--model.init_args.fd_samples=64",
        "--model.init_args.sample_steps=4",
        "--data.init_args.batch_size=32",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps // 2}",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=5",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fit_validate_predict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = DiffusionCLI(args=["fit", *tiny_args(tmp_path)])
    log_dir = Path(cli.trainer.log_dir)
    checkpoints = sorted((log_dir / "checkpoints").glob("epoch=*.ckpt"))
    assert len(checkpoints) == 1 and "step=20" in checkpoints[0].name
    last = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)  # LastCheckpoint, at the end
    assert last["global_step"] == 20
    assert (log_dir / "config.yaml").is_file()
    assert (log_dir / "samples" / "step_0000020.png").is_file()
    fds = [float(r["val/fd"]) for r in _metrics(log_dir) if r.get("val/fd")]
    assert len(fds) == 2 and all(math.isfinite(v) and v > 0 for v in fds)
    # The checkpoint holds only plain data (the CLI itself loads it with weights_only=True).
    assert torch.load(checkpoints[0], weights_only=True)["global_step"] == 20

    val = DiffusionCLI(args=["validate", *tiny_args(tmp_path), f"--ckpt_path={checkpoints[0]}"])
    metrics = val.trainer.callback_metrics
    assert math.isfinite(float(metrics["val/loss"])) and math.isfinite(float(metrics["val/fd"]))

    pred = DiffusionCLI(args=["predict", *tiny_args(tmp_path), f"--ckpt_path={checkpoints[0]}",
                              "--trainer.limit_predict_batches=1"])
    grid = Path(pred.trainer.log_dir) / "samples" / "predict_rank0_batch0000.png"
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width >= 32 * 5  # 32 digits, tiles enlarged to 32 px


def test_print_config_round_trip(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        DiffusionCLI(args=["fit", "--config", QUICKSTART, "--print_config"])
    assert exit_info.value.code in (0, None)
    first = capsys.readouterr().out
    assert "lightning_diffusion.networks.UNet" in first and "MinSNRWeighting" in first
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    with pytest.raises(SystemExit):
        DiffusionCLI(args=["fit", "--config", str(saved), "--print_config"])
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "override, sentence",
    [
        (["--data=lightning_diffusion.data.ImageFolderDataModule", "--data.path=/no/such/folder"],
         "ImageFolderDataModule.path: '/no/such/folder' is not an existing folder"),
        (["--data.init_args.image_size=9"], "UNet.image_size=9 is not divisible"),
        (["--model.init_args.weighting.init_args.gamma=0"], "MinSNRWeighting.gamma=0.0 must be > 0."),
        (["--model.init_args.prediction=noise"], "prediction='noise' is not supported"),
        (["--data.init_args.batch_size=5000"], "DigitsDataModule.batch_size: 5000 exceeds"),
    ],
)
def test_bad_input_is_one_sentence(tmp_path, capsys, override, sentence):
    with pytest.raises(SystemExit) as exit_info:
        DiffusionCLI(args=["fit", *tiny_args(tmp_path), *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and sentence in error_lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "lightning_logs").exists()  # nothing written


def test_ddp_two_cpu_ranks_through_the_real_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", *tiny_args(tmp_path, steps=10),
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 alone writes: one log folder, one config, one checkpoint, one set of grids.
    versions = list((tmp_path / "lightning_logs").iterdir())
    assert len(versions) == 1
    log_dir = versions[0]
    assert sorted(p.name for p in log_dir.glob("checkpoints/*.ckpt")) == ["epoch=0-step=10.ckpt", "last.ckpt"]
    assert (log_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (log_dir / "samples").iterdir()) == ["last.png", "step_0000005.png", "step_0000010.png"]
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # 10 optimizer steps x 32 images x 2 ranks; each rank counts its own micro-batches.
    assert ckpt["global_step"] == 10 and ckpt["diffusion"]["draws"] == 10
    fds = [float(r["val/fd"]) for r in _metrics(log_dir) if r.get("val/fd")]
    assert fds and all(math.isfinite(v) for v in fds)


def test_resume_uses_this_runs_settings_and_names_the_changes(tmp_path, caplog):
    # LightningCLI alone would rebuild the model from the checkpoint's settings and Lightning would
    # restore the checkpoint's learning rate: a lower rate given on resume would be silently dropped.
    args = [*tiny_args(tmp_path, steps=4), "--model.init_args.fd_samples=0"]
    first = DiffusionCLI(args=["fit", *args])
    checkpoint = first.trainer.checkpoint_callback.best_model_path
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    logger = logging.getLogger("lightning.pytorch")  # Lightning's own handler does not propagate
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    try:
        resumed = DiffusionCLI(args=["fit", *args, "--model.init_args.optimizer.init_args.lr=0.0001",
                                     "--model.init_args.label_dropout=0.2", "--trainer.max_steps=6",
                                     f"--ckpt_path={checkpoint}"])
    finally:
        logger.removeHandler(caplog.handler)
    assert resumed.trainer.global_step == 6 and resumed.model.label_dropout == 0.2
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == 0.0001
    said = caplog.text
    assert ("--ckpt_path: resuming with this run's model settings where they differ from the checkpoint's: "
            "label_dropout=0.2 (checkpoint: 0.1), optimizer.init_args.lr=0.0001 (checkpoint: 0.002)") in said, said
    assert "Resumed with this run's optimizer settings: lr 0.002 -> 0.0001" in said, said
