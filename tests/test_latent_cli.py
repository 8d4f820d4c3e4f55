"""Latent diffusion through the real command line: a 2-rank CPU DDP fit that encodes on first use, then
``validate`` and ``predict`` from its checkpoint decode with the latent space the checkpoint recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from digest_callback import subprocess_env  # tests/ is on sys.path

from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.data.latent_shards import LatentShards

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "latent_digits.yaml"
STEPS = 8


def _small(tmp_path: Path) -> list[str]:
    return ["--model.init_args.net.init_args.model_channels=16", "--model.init_args.sample_steps=2",
            "--data.init_args.batch_size=32", f"--data.init_args.path={tmp_path / 'latents'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_fit_on_latents_then_validate_and_predict_decode(tmp_path):
    args = ["fit", "--config", str(RECIPE), "--config", str(ROOT / "configs" / "trainer" / "cpu_ddp.yaml"),
            *_small(tmp_path), "--model.init_args.fd_samples=0", f"--trainer.max_steps={STEPS}",
            f"--trainer.val_check_interval={STEPS}", f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.callbacks+=digest_callback.DigestCallback"]
    result = subprocess.run([sys.executable, "-m", "lightning_diffusion", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=360, env=subprocess_env(tmp_path / "digests"))
    assert result.returncode == 0, result.stderr[-3000:]
    # encoded once on first use (prepare_data on rank 0), and the ranks trained identically
    assert len(LatentShards(tmp_path / "latents")) == 1797
    ranks = [digest_file.read_text() for digest_file in sorted((tmp_path / "digests").iterdir())]
    assert len(ranks) == 2

    one, two = (json.loads(r) for r in ranks)
    assert one["global_step"] == two["global_step"] == STEPS and one["params"] == two["params"]
    log_dir = tmp_path / "run" / "lightning_logs" / "version_0"
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    latents = torch.load(checkpoint, weights_only=True)["diffusion"]["latents"]
    assert latents["autoencoder"]["name"] == "DigitsAutoencoder" and len(latents["scale"]) == 4

    # validate from the checkpoint, on one process, with the decoded FD switched on
    cli = DiffusionCLI(args=["validate", "--config", str(log_dir / "config.yaml"), "--ckpt_path", str(checkpoint),
                             "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false",
                             "--model.init_args.fd_samples=32", "--trainer.enable_progress_bar=false",
                             "--trainer.callbacks=[]"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/fd"])
    assert cli.model.latent_space is not None and cli.model.latent_space.state() == latents

    # predict from the checkpoint: the module it restores returns decoded digits, not latents
    cli = DiffusionCLI(args=["predict", "--config", str(log_dir / "config.yaml"), "--ckpt_path", str(checkpoint),
                             "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false",
                             "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false",
                             "--trainer.callbacks=[]"])
    assert cli.model.latent_space is not None and cli.model.latent_space.state() == latents
    batch = next(iter(cli.datamodule.predict_dataloader()))
    assert batch[0].shape[1:] == (4, 4, 4)
    images = cli.model.predict_step(batch, 0)
    assert images.shape == (batch[0].shape[0], 1, 8, 8) and images.abs().max() <= 1
