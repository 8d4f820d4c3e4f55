"""DiT from timm blocks: paper sizes, adaLN-zero identity at init, patch layout, bf16, training."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

from conftest import assert_fit_lowers_val_loss
from lightning_diffusion import DiffusionLightningModule, EDMProcess
from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.core.precondition import Parametrization, edm_coefficients
from lightning_diffusion.core.weighting import EDMWeighting
from lightning_diffusion.networks import DIT_SIZES, DiT


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(num_classes: int = 0) -> DiT:
    return DiT(in_channels=1, image_size=8, patch_size=2, num_classes=num_classes, **DIT_SIZES["tiny"])


# Peebles & Xie 2023, Table 1 (256x256 images = 32x32x4 latents, 1000 classes, learned sigma:
# 8 output channels). The paper's counts include the fixed position embedding, a buffer here.
@pytest.mark.parametrize("size,expected", [("S", 33.0e6), ("B", 130.5e6), ("L", 458.0e6), ("XL", 675.0e6)])
def test_patch2_parameter_counts_match_the_paper(size, expected):
    with torch.device("meta"):
        net = DiT(in_channels=4, out_channels=8, image_size=32, patch_size=2, num_classes=1000, **DIT_SIZES[size])
    count = sum(p.numel() for p in net.parameters()) + net.pos_embed.numel()
    assert abs(count - expected) / expected < 0.01


def test_built_from_timm_layers():
    net = tiny()
    assert isinstance(net.patch_embed, PatchEmbed) and isinstance(net.noise_embed, Mlp)
    assert all(isinstance(b.attn, Attention) and isinstance(b.mlp, Mlp) for b in net.blocks)


def test_adaln_zero_makes_the_denoiser_c_skip_x_at_init():
    net = tiny(num_classes=10)
    x, sigma = torch.randn(6, 1, 8, 8), torch.exp(torch.randn(6))
    labels = torch.tensor([0, 1, 2, 3, 10, 9])
    assert torch.equal(net(x, torch.log(sigma) / 4, labels), torch.zeros_like(x))
    denoised = Parametrization(EDMProcess(), "x0").predict(net, x, sigma, labels)
    torch.testing.assert_close(denoised, edm_coefficients(sigma)[0].reshape(-1, 1, 1, 1) * x)
    # each block starts as the identity on its tokens
    tokens, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert torch.equal(net.blocks[0](tokens, c), tokens)


def test_unpatchify_inverts_the_patch_embedding_layout():
    # Make the patch embedding copy pixel (ch, i, j) of each patch to feature (i*p + j)*C + ch,
    # the layout the output linear writes: unpatchify must then give back the image.
    net = DiT(in_channels=3, image_size=8, patch_size=2, hidden_size=12, depth=1, num_heads=1)
    eye = torch.zeros(12, 3, 2, 2)
    for i in range(2):
        for j in range(2):
            for ch in range(3):
                eye[(i * 2 + j) * 3 + ch, ch, i, j] = 1
    with torch.no_grad():
        net.patch_embed.proj.weight.copy_(eye)
        net.patch_embed.proj.bias.zero_()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net.unpatchify(net.patch_embed(x)), x)


def test_null_label_has_its_own_embedding_and_none_means_null():
    net = tiny(num_classes=10)
    with torch.no_grad():
        net.class_embed.weight.normal_()
    c = torch.randn(3)
    torch.testing.assert_close(net.embed(c, None, 3), net.embed(c, torch.full((3,), 10), 3))
    assert not torch.allclose(net.embed(c, None, 3), net.embed(c, torch.zeros(3, dtype=torch.long), 3))


def test_bad_sizes_fail_in_one_sentence():
    with pytest.raises(ValueError, match=r"DiT.image_size=10 is not divisible by DiT.patch_size=4"):
        DiT(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match=r"DiT.hidden_size=66 must be divisible by 4 and by DiT.num_heads=4"):
        DiT(hidden_size=66, num_heads=4)


def _open_gates(net: DiT) -> DiT:
    with torch.no_grad():
        for block in net.blocks:
            block.adaLN[1].bias.normal_()
        net.linear_out.weight.normal_(std=0.02)
    return net


def test_forward_backward_under_bf16_autocast_and_compile_in_one_graph():
    net = _open_gates(tiny(num_classes=10))
    x, c, labels = torch.randn(4, 1, 8, 8), torch.randn(4), torch.tensor([1, 2, 3, 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, c, labels)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, c, labels), net(x, c, labels))


def test_short_training_run_lowers_validation_loss(digits):
    module = DiffusionLightningModule(tiny(), process=EDMProcess(), prediction="x0", weighting=EDMWeighting(),
                                      optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    assert_fit_lowers_val_loss(module, digits, steps=120, factor=0.6)


ROOT = Path(__file__).resolve().parents[1]


def test_dit_tiny_config_trains_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = DiffusionCLI(args=[
        "fit", "--config", str(ROOT / "configs" / "dit_tiny.yaml"), "--model.init_args.fd_samples=0",
        "--data.init_args.batch_size=32", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"])
    net = cli.model.net
    assert isinstance(net, DiT) and net.num_classes == 10 and net.image_size == 8  # linked from the data
    assert cli.trainer.global_step == 3
    assert any(b.adaLN[1].weight.abs().sum() > 0 for b in net.blocks)  # adaLN-zero layers did train


def test_gpu_recipe_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        DiffusionCLI(args=["fit", "--config", str(ROOT / "configs" / "gpu" / "dit_b2.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "lightning_diffusion.networks.DiT" in printed and "hidden_size: 768" in printed
