"""A plain DDPM LightningModule (not a DiffusionLightningModule) using the library's callbacks.

The module keeps its own ``training_step``; the callback protocol (docs/callbacks.md) asks three
things of it: a ``timesteps`` distribution it draws its levels from, its ``process``, and a
``training_step`` that returns ``step_output(...)``; ``lookahead_loss`` adds the adaptive sampler.

    python examples/plain_ddpm.py --sampler loss_aware --max_steps 300      # or --sampler adaptive
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from lightning_diffusion.core.noise import VPProcess
from lightning_diffusion.core.seeds import stream_seed
from lightning_diffusion.core.weighting import min_snr_weight
from lightning_diffusion.networks import UNet
from lightning_diffusion.protocol import step_output
from lightning_diffusion.timesteps import UniformTimesteps


class PlainDDPM(pl.LightningModule):
    """eps-prediction DDPM on class-conditional 8x8 digits with Min-SNR-gamma weighting."""

    def __init__(self, lr: float = 2e-3, gamma: float = 5.0, num_timesteps: int = 1000) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = UNet(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(), num_classes=10)
        self.process = VPProcess("linear", num_timesteps)  # protocol: the noise process
        self.timesteps = UniformTimesteps(num_timesteps)  # protocol: samplers wrap it, the curriculum restricts it

    def loss_at(self, x0, noise, t, labels):
        """Per-sample Min-SNR-weighted eps loss at timesteps ``t``."""
        eps = self.net(self.process.add_noise(x0, noise, t), t.float(), labels)
        weight = min_snr_weight(self.process.snr(t), self.hparams.gamma, "eps")
        return weight * (eps.float() - noise.float()).square().flatten(1).mean(1)

    def training_step(self, batch, batch_idx):
        x0, labels = batch
        g = torch.Generator(x0.device).manual_seed(stream_seed(0, self.global_rank, self.global_step, batch_idx))
        t, w = self.timesteps.sample(len(x0), x0.device, g, x0=x0, labels=labels)
        per_sample = self.loss_at(x0, torch.randn(x0.shape, generator=g, device=x0.device), t, labels)
        return step_output((w * per_sample).mean(), per_sample, t, w)

    @torch.no_grad()
    def lookahead_loss(self, x0, noise, t, labels):  # protocol: for AdaptiveTimestepSampling
        return self.loss_at(x0, noise, t, labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)


def callbacks(sampler: str, root: str, checkpoint_every: int) -> list[pl.Callback]:
    """A sampler, the curriculum, post-hoc EMA snapshots and last.ckpt every ``checkpoint_every`` steps."""
    from lightning_diffusion.callbacks import (AdaptiveTimestepSampling, LastCheckpoint, LossAwareTimestepSampling,
                                               PostHocEMA, TimestepCurriculum)

    chosen = (LossAwareTimestepSampling(history=2) if sampler == "loss_aware"
              else AdaptiveTimestepSampling(update_every=5, probe_grid=8, show_subset=False))
    return [chosen, TimestepCurriculum(num_clusters=4, patience=3, max_steps_per_stage=6, check_every_n_steps=2,
                                       verbose=False),
            PostHocEMA((0.05, 0.10), snapshot_every_nimg=256, dirpath=f"{root}/phema"),
            LastCheckpoint(every_n_steps=checkpoint_every, dirpath=f"{root}/checkpoints")]


def main(argv: list[str] | None = None) -> None:
    from lightning_diffusion.data import DigitsDataModule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", choices=("loss_aware", "adaptive"), default="loss_aware")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--root", default="outputs/plain_ddpm")
    parser.add_argument("--checkpoint_every", type=int, default=100)
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--extra_callback", default=None, help="module:Class of one more callback (tests)")
    args = parser.parse_args(argv)
    extra = []
    if args.extra_callback:
        import importlib

        module, name = args.extra_callback.split(":")
        extra = [getattr(importlib.import_module(module), name)()]
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=args.max_steps, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks(args.sampler, args.root,
                                                                         args.checkpoint_every) + extra)
    trainer.fit(PlainDDPM(), DigitsDataModule(batch_size=32), ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main()
