"""Learned uncertainty weighting (docs/algorithms.md 3.2): optimum, noise-level mapping, module wiring."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from conftest import tiny_unet
from lightning_diffusion import DiffusionLightningModule, EDMProcess, VPProcess
from lightning_diffusion.core.weighting import EDMWeighting
from lightning_diffusion.networks import UncertaintyHead, uncertainty_noise_level
from lightning_diffusion.networks.uncertainty import uncertainty_loss
from lightning_diffusion.validation import validation_losses


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_u_converges_to_log_of_expected_weighted_error_on_fixed_errors():
    # Fixed per-sample errors at 4 noise levels; the loss lambda/exp(u) * err + u is minimal at
    # u(sigma) = ln E[lambda(sigma) * err | sigma] (3.2), which the head must learn.
    sigmas = torch.tensor([0.05, 0.3, 1.5, 20.0])
    lam = EDMWeighting()(EDMProcess().snr(sigmas), "x0")
    errors = torch.rand(4, 256) * torch.tensor([0.002, 0.05, 0.2, 0.24])[:, None]
    expected = torch.log(lam * errors.mean(1))
    head = UncertaintyHead(channels=64)
    c_noise = uncertainty_noise_level(EDMProcess(), sigmas)[:, None].expand(4, 256).reshape(-1)
    weighted = (lam[:, None] * errors).reshape(-1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        uncertainty_loss(weighted, head(c_noise)).mean().backward()
        opt.step()
        head.linear.normalize_weights_()
    learned = head(uncertainty_noise_level(EDMProcess(), sigmas))
    torch.testing.assert_close(learned, expected, atol=0.05, rtol=0)


def test_noise_level_mapping_edm_and_vp():
    sigma = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(uncertainty_noise_level(EDMProcess(), sigma), sigma.log() / 4)
    vp = VPProcess("cosine")
    t = torch.tensor([0, 500, 999])
    # a VP sample with SNR has the noise-to-signal ratio of sigma = 1/sqrt(SNR)
    torch.testing.assert_close(uncertainty_noise_level(vp, t), torch.log(vp.snr(t).float().rsqrt()) / 4)
    zero_terminal = VPProcess("linear", zero_terminal_snr=True)
    value = uncertainty_noise_level(zero_terminal, torch.tensor([999]))
    assert torch.isfinite(value).all() and value.item() == pytest.approx(-0.125 * math.log(1e-10), rel=1e-5)


def _module(process, prediction, **kwargs) -> DiffusionLightningModule:
    return DiffusionLightningModule(tiny_unet(), process=process, prediction=prediction,
                                    optimizer=functools.partial(torch.optim.Adam, lr=1e-3), **kwargs)


@pytest.mark.parametrize("process,prediction", [(EDMProcess(), "x0"), (VPProcess(), "v")])
def test_module_trains_on_weighted_mse_over_exp_u_plus_u(process, prediction):
    head = UncertaintyHead(channels=32)
    module = _module(process, prediction, uncertainty=head)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    out = module.diffusion_loss(x0, None, torch.Generator().manual_seed(3))
    u = head(uncertainty_noise_level(process, out["level"]))
    expected = ((out["per_sample_loss"] * torch.exp(-u) + u) * out["importance_weight"]).mean()
    torch.testing.assert_close(out["loss"], expected)
    # per_sample_loss stays weight * mse (what callbacks read), u excluded
    plain = _module(process, prediction)
    plain.net.load_state_dict(module.net.state_dict())
    reference = plain.diffusion_loss(x0, None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["per_sample_loss"], reference["per_sample_loss"])
    assert not torch.allclose(out["loss"], reference["loss"])


def test_validation_loss_excludes_u_and_head_is_optimized():
    with_head = _module(EDMProcess(), "x0", uncertainty=UncertaintyHead(channels=32))
    without = _module(EDMProcess(), "x0")
    without.net.load_state_dict(with_head.net.state_dict())
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    a = validation_losses(with_head, x0, None, torch.Generator().manual_seed(1))
    b = validation_losses(without, x0, None, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["loss"], b["loss"])
    optimized = {id(p) for group in with_head.configure_optimizers().param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in with_head.uncertainty.parameters())


def test_head_runs_in_fp32_under_bf16_autocast():
    head = UncertaintyHead(channels=16)
    module = _module(EDMProcess(), "x0", uncertainty=head)
    dtypes = []
    head.linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.diffusion_loss(torch.rand(4, 1, 8, 8), None, torch.Generator().manual_seed(0))
        head(torch.zeros(4))  # the control: called under autocast, the matmul would be bf16
    assert dtypes == [torch.float32, torch.bfloat16]
    out["loss"].backward()
    assert head.linear.weight.grad is not None and torch.isfinite(head.linear.weight.grad).all()
