"""Every shipped recipe parses, builds and trains two steps on CPU (GPU recipes: parse and build only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_diffusion.cli import DiffusionCLI

ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
GPU_RECIPES = sorted((ROOT / "configs" / "gpu").glob("*.yaml"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", CPU_RECIPES, ids=lambda p: p.name)
def test_recipe_trains_two_steps(path, tmp_path):
    cli = DiffusionCLI(args=[
        "fit", "--config", str(path), "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=2", "--model.init_args.fd_samples=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.precision=32-true", "--trainer.strategy=auto", "--trainer.num_nodes=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        *([f"--data.init_args.path={tmp_path / 'latents'}"] if path.name.startswith("latent") else []),
    ])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    if path.name == "mixture.yaml":  # scored against the exact denoiser (docs/algorithms.md 7)
        assert torch.isfinite(cli.trainer.callback_metrics["val/excess_pct"])


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_builds(path, tmp_path):
    # the GPU recipes read data sets that are not shipped: build them over the embedded digits instead
    cli = DiffusionCLI(args=["--config", str(path), "--data=lightning_diffusion.data.DigitsDataModule",
                             "--trainer.accelerator=cpu", "--trainer.devices=1",
                             "--trainer.precision=32-true", "--trainer.strategy=auto", "--trainer.num_nodes=1",
                             f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    assert sum(p.numel() for p in cli.model.parameters()) > 10_000_000
