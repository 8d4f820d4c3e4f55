"""EDM2 UNet (docs/algorithms.md 3.1): preset sizes, identity at init, magnitudes, forced weight normalization, training."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import assert_fit_lowers_val_loss, quiet_trainer
from lightning_diffusion import DiffusionLightningModule, EDMProcess
from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.core.precondition import Parametrization, edm_coefficients
from lightning_diffusion.core.weighting import EDMWeighting
from lightning_diffusion.networks import EDM2_PRESETS, EDM2UNet, MPConv, UncertaintyHead
from lightning_diffusion.networks.mp import mp_silu
from lightning_diffusion.optim import EDM2LRScheduler


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(num_classes: int = 0, **kwargs) -> EDM2UNet:
    args = dict(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                attention_resolutions=(4,), channels_per_head=16, num_classes=num_classes)
    return EDM2UNet(**{**args, **kwargs})


def ungate(net: EDM2UNet) -> EDM2UNet:
    """Set every learned gain to 1 (they start at 0) so all paths carry signal."""
    with torch.no_grad():
        for p in net.parameters():
            if p.numel() == 1:  # emb_gain, out_gain
                p.fill_(1.0)
    return net


def mp_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, MPConv)]


def assert_unit_rms_rows(module: torch.nn.Module) -> None:
    for w in mp_weights(module):
        torch.testing.assert_close(w.flatten(1).square().mean(1), torch.ones(w.shape[0]), atol=2e-3, rtol=0)


# The paper's ImageNet-512 presets (Karras et al. 2024, Table 2), counting every parameter of the
# network including the class embedding (1000 x emb channels); the uncertainty head is separate.
@pytest.mark.parametrize("name,expected", [("XS", 125e6), ("S", 280e6), ("M", 498e6), ("L", 777e6),
                                           ("XL", 1.12e9), ("XXL", 1.52e9)])
def test_preset_parameter_counts_match_the_paper(name, expected):
    with torch.device("meta"):
        net = EDM2UNet(in_channels=4, image_size=64, model_channels=EDM2_PRESETS[name], channel_mult=(1, 2, 3, 4),
                       num_blocks=3, attention_resolutions=(16, 8), num_classes=1000)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - expected) / expected < 0.01


def test_preconditioned_denoiser_is_c_skip_x_at_init():
    net = tiny(num_classes=10)
    x, sigma = torch.randn(6, 1, 8, 8), torch.exp(torch.randn(6))
    labels = torch.tensor([0, 1, 2, 3, 10, 9])
    assert torch.equal(net(x, torch.log(sigma) / 4, labels), torch.zeros_like(x))
    denoised = Parametrization(EDMProcess(), "x0").predict(net, x, sigma, labels)
    c_skip = edm_coefficients(sigma)[0].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(denoised, c_skip * x)


def test_every_block_keeps_unit_rms_activations():
    net = ungate(EDM2UNet(in_channels=3, image_size=16, model_channels=32, channel_mult=(1, 2, 2), num_blocks=2,
                          attention_resolutions=(8,), channels_per_head=16, num_classes=10))
    rms: list[float] = []
    for block in [*net.encoder, *net.decoder]:
        block.register_forward_hook(lambda m, i, o: rms.append(o.square().mean().sqrt().item()))
    out = net(torch.randn(32, 3, 16, 16), torch.randn(32), torch.randint(0, 11, (32,)))
    assert len(rms) == len(net.encoder) + len(net.decoder)
    assert all(0.7 < r < 1.4 for r in rms), rms
    assert 0.7 < out.square().mean().sqrt().item() < 1.4


def test_null_label_is_the_zero_class_vector():
    net = tiny(num_classes=10)
    c = torch.randn(3)
    noise_only = net.emb_noise(net.emb_fourier(c))
    expected = mp_silu(noise_only * 0.5 / 0.5**0.5)  # mp_sum(noise, 0, 0.5)
    torch.testing.assert_close(net.embed(c, torch.full((3,), 10), 3), expected)
    torch.testing.assert_close(net.embed(c, None, 3), expected)
    assert not torch.allclose(net.embed(c, torch.zeros(3, dtype=torch.long), 3), expected)


def test_image_size_the_downsampling_cannot_divide_fails_in_one_sentence():
    sentence = r"EDM2UNet.image_size=12 is not divisible by 2\*\*\(len\(channel_mult\)-1\)=8"
    with pytest.raises(ValueError, match=sentence):
        EDM2UNet(image_size=12, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="EDM2UNet got input of shape"):
        tiny()(torch.randn(2, 1, 16, 16), torch.zeros(2))


def test_forward_never_modifies_weights_in_train_or_eval():
    net = ungate(tiny(num_classes=10))
    with torch.no_grad():
        for w in mp_weights(net):
            w.mul_(2.0)  # off unit RMS: a forward-time renormalization would show
    stored = [p.detach().clone() for p in net.parameters()]
    for mode in (True, False):
        net.train(mode)
        net(torch.randn(4, 1, 8, 8), torch.randn(4), torch.tensor([1, 2, 3, 10])).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(stored, net.parameters()))


def test_forward_backward_under_bf16_autocast_on_cpu():
    net = ungate(tiny(num_classes=10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(4, 1, 8, 8), torch.randn(4), torch.tensor([1, 2, 3, 10]))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_compiles_in_one_graph_and_sees_renormalized_weights():
    net = ungate(tiny(model_channels=8, channels_per_head=8))
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # fullgraph: no graph breaks
    x, c = torch.randn(4, 1, 8, 8), torch.randn(4)
    torch.testing.assert_close(compiled(x, c), net(x, c))
    with torch.no_grad():
        for w in mp_weights(net):
            w.add_(torch.randn_like(w))
    for m in net.modules():
        if isinstance(m, MPConv):
            m.normalize_weights_()
    torch.testing.assert_close(compiled(x, c), net(x, c))


class CountingModule(DiffusionLightningModule):
    """Counts forced-normalization passes (module level: must pickle)."""

    calls = 0

    def normalize_weights_(self) -> None:
        CountingModule.calls += 1
        super().normalize_weights_()


def edm_module(cls=DiffusionLightningModule, lr: float = 1e-2, **kwargs) -> DiffusionLightningModule:
    return cls(tiny(), process=EDMProcess(), prediction="x0", weighting=EDMWeighting(),
               optimizer=functools.partial(torch.optim.Adam, lr=lr, betas=(0.9, 0.99)), **kwargs)


def loader(n: int = 32, batch: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(n, 1, 8, 8) * 2 - 1), batch_size=batch)


def test_forced_normalization_runs_once_per_optimizer_step_with_accumulation():
    CountingModule.calls = 0
    module = edm_module(CountingModule, uncertainty=UncertaintyHead())
    quiet_trainer(max_steps=3, accumulate_grad_batches=2, limit_val_batches=0).fit(module, loader(48))
    assert CountingModule.calls == 3
    assert_unit_rms_rows(module.net)
    assert_unit_rms_rows(module.uncertainty)


def test_without_forced_normalization_adam_moves_stored_weights_off_unit_rms():
    # The control for the test above: the same updates without the hook leave the unit sphere.
    net = ungate(tiny())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 1, 8, 8), torch.randn(8)).square().mean().backward()
        opt.step()
    drift = max((w.flatten(1).square().mean(1) - 1).abs().max().item() for w in mp_weights(net))
    assert drift > 1e-2


class _DumpWeights(pl.Callback):
    """Each DDP rank saves its network (ddp_spawn: the parent never sees the workers' objects)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.net.state_dict(), os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


@pytest.mark.timeout(120)
def test_ddp_ranks_keep_identical_unit_rms_weights(tmp_path):
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, devices=2, strategy="ddp_spawn",
                            accumulate_grad_batches=2, callbacks=[_DumpWeights(str(tmp_path))])
    trainer.fit(edm_module(), loader(64))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    net = tiny()
    net.load_state_dict(ranks[0])
    assert_unit_rms_rows(net)
    assert any(ranks[0][k].ne(0).any() for k in ranks[0] if k.endswith("gain"))  # it did train


def test_short_training_run_with_uncertainty_and_edm2_lr_lowers_validation_loss(digits):
    module = edm_module(uncertainty=UncertaintyHead(), lr_scheduler=functools.partial(
        EDM2LRScheduler, batch_size=64, ref_images=64 * 100, rampup_images=64 * 20))
    assert_fit_lowers_val_loss(module, digits, steps=120, factor=0.6)


ROOT = Path(__file__).resolve().parents[1]


def test_edm2_tiny_config_trains_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = DiffusionCLI(args=[
        "fit", "--config", str(ROOT / "configs" / "edm2_tiny.yaml"),
        "--model.init_args.net.init_args.model_channels=16", "--model.init_args.net.init_args.channels_per_head=16",
        "--model.init_args.fd_samples=0", "--data.init_args.batch_size=32", "--trainer.max_steps=4",
        "--trainer.limit_val_batches=1", "--trainer.val_check_interval=4", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"])
    module = cli.model
    assert isinstance(module.net, EDM2UNet) and module.net.num_classes == 10  # linked from the data
    assert isinstance(module.uncertainty, UncertaintyHead)
    lr = cli.trainer.optimizers[0].param_groups[0]["lr"]
    # the 5th step's rate; images per step read from the trainer: data.batch_size 32 x 1 device
    assert cli.trainer.lr_scheduler_configs[0].scheduler.batch_size == 32
    assert lr == pytest.approx(0.01 * min(5 * 32 / 12800, 1))
    assert_unit_rms_rows(module.net)
    checkpoint = next(Path(cli.trainer.log_dir, "checkpoints").glob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert "uncertainty.linear.weight" in state and "uncertainty.fourier.freqs" in state


def test_gpu_recipe_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        DiffusionCLI(args=["fit", "--config", str(ROOT / "configs" / "gpu" / "edm2_s.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "EDM2UNet" in printed and "model_channels: 192" in printed and "EDM2LRScheduler" in printed
