"""Magnitude-preserving primitives (docs/algorithms.md 3.1): unit RMS out for unit RMS in, weight-scale invariance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_diffusion.networks.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize

N = 200_000  # samples for the expectation checks: RMS error ~ 1/sqrt(N) << the 2% tolerance


def rms(x: torch.Tensor) -> float:
    return x.float().square().mean().sqrt().item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_normalize_matches_formula_and_gives_unit_rms_per_channel():
    w = torch.randn(6, 5, 3, 3) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    out = normalize(w)
    expected = w / (1e-4 + w.flatten(1).norm(dim=1).reshape(6, 1, 1, 1) / math.sqrt(45))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.flatten(1).square().mean(1), torch.ones(6), atol=1e-3, rtol=0)
    # pixel norm: dim=1 on activations gives unit RMS over channels at every position
    x = torch.randn(2, 8, 4, 4) * 5
    torch.testing.assert_close(normalize(x, dim=1).square().mean(1), torch.ones(2, 4, 4), atol=1e-3, rtol=0)


def test_mp_silu_constant_is_the_rms_of_silu_on_a_unit_gaussian():
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    second_moment = torch.trapezoid(F.silu(z) ** 2 * torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi), z)
    assert second_moment.sqrt().item() == pytest.approx(0.596, abs=5e-4)
    assert rms(mp_silu(torch.randn(N))) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.8])
def test_mp_sum_keeps_unit_rms_and_blends_in_proportion(t):
    a, b = torch.randn(N), torch.randn(N)
    out = mp_sum(a, b, t)
    assert rms(out) == pytest.approx(1.0, rel=0.02)
    scale = math.sqrt((1 - t) ** 2 + t**2)
    torch.testing.assert_close(out, ((1 - t) * a + t * b) / scale)


@pytest.mark.parametrize("t", [0.25, 0.5])
def test_mp_cat_keeps_unit_rms_and_splits_energy_by_t(t):
    a, b = torch.randn(4000, 16), torch.randn(4000, 48)
    out = mp_cat(a, b, dim=1, t=t)
    assert out.shape == (4000, 64)
    assert rms(out) == pytest.approx(1.0, rel=0.02)
    energy_a, energy_b = out[:, :16].square().sum(1).mean(), out[:, 16:].square().sum(1).mean()
    assert (energy_a / energy_b).item() == pytest.approx((1 - t) ** 2 / t**2, rel=0.03)


def test_mp_fourier_unit_rms_fp32_and_checkpointed_buffers():
    fourier = MPFourier(4096)
    out = fourier(torch.randn(64, dtype=torch.float64))
    assert out.shape == (64, 4096) and out.dtype == torch.float64
    assert rms(out) == pytest.approx(1.0, rel=0.02)
    assert set(fourier.state_dict()) == {"freqs", "phases"}
    other = MPFourier(4096)
    other.load_state_dict(fourier.state_dict())
    x = torch.randn(8)
    torch.testing.assert_close(other(x), fourier(x))


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_mpconv_unit_rms_out_for_unit_rms_in(kernel):
    conv = MPConv(64, 32, kernel)
    x = torch.randn(256, 64) if not kernel else torch.randn(16, 64, 16, 16)
    y = conv(x)
    if kernel == (3, 3):
        y = y[:, :, 1:-1, 1:-1]  # zero padding shrinks the border: measure the interior
    assert rms(y) == pytest.approx(1.0, rel=0.05)
    torch.testing.assert_close(conv(x, gain=0.5), 0.5 * conv(x))
    assert torch.equal(conv(x, gain=torch.zeros([])), torch.zeros_like(conv(x)))


def test_mpconv_output_is_invariant_to_the_stored_weight_scale():
    conv = MPConv(16, 8, (3, 3))
    x = torch.randn(4, 16, 6, 6)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.arange(1, 9).reshape(8, 1, 1, 1) * 3.0)  # every channel scaled differently
    torch.testing.assert_close(conv(x), before, atol=1e-5, rtol=1e-4)


def test_forced_weight_normalization_restores_unit_rms_without_changing_the_output():
    conv = MPConv(16, 8, (3, 3))
    torch.testing.assert_close(conv.weight.flatten(1).square().mean(1), torch.ones(8), atol=1e-3, rtol=0)
    x = torch.randn(4, 16, 6, 6)
    with torch.no_grad():
        conv.weight.mul_(5.0).add_(torch.randn_like(conv.weight))
    before = conv(x)
    conv.normalize_weights_()
    torch.testing.assert_close(conv.weight.flatten(1).square().mean(1), torch.ones(8), atol=1e-3, rtol=0)
    torch.testing.assert_close(conv(x), before, atol=1e-5, rtol=1e-4)


def test_mpconv_gradient_is_orthogonal_to_the_weight():
    # Differentiable normalization in forward: no gradient component along w, so the stored
    # scale cannot drift from the gradient itself (only from optimizer noise, which 3.1's
    # forced normalization removes).
    conv = MPConv(32, 4, ())
    conv(torch.randn(64, 32)).square().sum().backward()
    radial = (conv.weight.grad * conv.weight).sum(1) / conv.weight.norm(dim=1)
    assert radial.abs().max().item() < 1e-4 * conv.weight.grad.norm().item()


def test_forward_never_writes_the_weights_in_train_or_eval():
    conv = MPConv(8, 8, (3, 3))
    with torch.no_grad():
        conv.weight.mul_(3.0)  # off unit norm: a forward that renormalized would change it
    stored = conv.weight.detach().clone()
    for mode in (True, False):
        conv.train(mode)
        conv(torch.randn(2, 8, 5, 5)).sum().backward()
    assert torch.equal(conv.weight, stored)


@pytest.mark.parametrize("kernel", [(2, 2), (3,), (0, 0)])
def test_mpconv_rejects_bad_kernels_in_one_sentence(kernel):
    with pytest.raises(ValueError, match=r"MPConv.kernel=.*must be \(\) \(linear\) or \(k, k\)"):
        MPConv(4, 4, kernel)
