"""Noise processes against the formulas of docs/algorithms.md section 0 (computed independently here)."""

import math

import numpy as np
import pytest
import torch

from lightning_diffusion.core.noise import EDMProcess, VPProcess


def ref_betas(schedule: str, T: int) -> np.ndarray:
    """Independent float64 numpy implementation of the beta schedules."""
    if schedule == "linear":
        return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    if schedule == "cosine":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    if schedule == "scaled_linear":
        return np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T) ** 2
    raise AssertionError(schedule)


@pytest.mark.parametrize("T", [1000, 250])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
def test_betas_and_alphas_cumprod_match_formulas(schedule, T):
    p = VPProcess(schedule=schedule, num_timesteps=T)
    betas = ref_betas(schedule, T)
    abar = np.cumprod(1 - betas)
    assert p.alphas_cumprod.dtype == torch.float64
    assert tuple(p.alphas_cumprod.shape) == (T,)
    np.testing.assert_allclose(p.betas.numpy(), betas, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(p.alphas_cumprod.numpy(), abar, rtol=1e-12, atol=1e-15)
    # SNR = abar / (1 - abar), float32 lookup, and NOT abar^2 / (1 - abar).
    t = torch.arange(T)
    snr = p.snr(t)
    assert snr.dtype == torch.float32
    expected = abar / (1 - abar)
    np.testing.assert_allclose(snr.numpy(), expected, rtol=1e-6)
    wrong = abar**2 / (1 - abar)
    mid = T // 2  # where abar is far from 1 the two formulas differ by a factor abar
    assert abs(snr[mid].item() - wrong[mid]) > 0.1 * expected[mid]


def test_linear_schedule_scales_with_T():
    b250 = VPProcess("linear", 250).betas
    assert b250[0].item() == pytest.approx(4e-4, rel=1e-12)
    assert b250[-1].item() == pytest.approx(0.08, rel=1e-12)
    b1000 = VPProcess("linear", 1000).betas
    assert b1000[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert b1000[-1].item() == pytest.approx(0.02, rel=1e-12)
    # Same end-point abar up to discretization: the scaled chain reaches comparable noise.
    a250 = VPProcess("linear", 250).alphas_cumprod[-1].item()
    a1000 = VPProcess("linear", 1000).alphas_cumprod[-1].item()
    assert a250 < 1e-3 and a1000 < 1e-3


def test_cosine_beta_clipped():
    betas = VPProcess("cosine", 1000).betas
    assert betas.max().item() == pytest.approx(0.999)
    assert (betas > 0).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
def test_zero_terminal_snr(schedule):
    T = 1000
    base = VPProcess(schedule, T)
    p = VPProcess(schedule, T, zero_terminal_snr=True)
    abar = p.alphas_cumprod
    assert abar[-1].item() == 0.0
    assert abar[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    # sqrt(abar) is an affine map of the original sqrt(abar).
    s0 = base.alphas_cumprod.sqrt().numpy()
    ref = (s0 - s0[-1]) * s0[0] / (s0[0] - s0[-1])
    np.testing.assert_allclose(abar.sqrt().numpy(), ref, rtol=1e-10, atol=1e-14)
    # betas are recomputed from abar, cumprod reproduces it; last beta is 1.
    np.testing.assert_allclose(torch.cumprod(1 - p.betas, 0).numpy(), abar.numpy(), rtol=1e-10, atol=1e-14)
    assert p.betas[-1].item() == pytest.approx(1.0)
    assert torch.isfinite(p.betas).all() and not torch.isnan(p.alphas_cumprod).any()
    t = torch.arange(T)
    snr = p.snr(t)
    assert torch.isfinite(snr).all()
    assert snr[-1].item() == 0.0
    assert (snr[:-1] > 0).all() and (snr[1:] <= snr[:-1]).all()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    eps = torch.randn(4, 3, 8, 8, generator=g)
    x_t = p.add_noise(x0, eps, torch.full((4,), T - 1))
    assert torch.isfinite(x_t).all()
    torch.testing.assert_close(x_t, eps)  # a = 0, s = 1 at the terminal step
    a, s = p.alpha_sigma(t)
    assert torch.isfinite(a).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_is_a_x0_plus_s_eps(schedule):
    p = VPProcess(schedule, 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 2, 5, generator=g)
    eps = torch.randn(6, 2, 5, generator=g)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    abar = p.alphas_cumprod[t]
    a = abar.sqrt().float().view(-1, 1, 1)
    s = (1 - abar).sqrt().float().view(-1, 1, 1)
    torch.testing.assert_close(p.add_noise(x0, eps, t), a * x0 + s * eps, rtol=1e-6, atol=1e-6)
    pa, ps = p.alpha_sigma(t)
    torch.testing.assert_close(pa, a.flatten())
    torch.testing.assert_close(ps, s.flatten())
    # Scaled (VE) form: x_t = a (x0 + sigma eps), sigma = s / a, SNR = 1/sigma^2.
    a2, sigma = p.scale_and_sigma(t)
    torch.testing.assert_close(a2, a.flatten())
    torch.testing.assert_close(1 / sigma**2, p.snr(t), rtol=1e-5, atol=0)


def test_edm_process_snr_and_noise():
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 80.0])
    unit = EDMProcess()
    torch.testing.assert_close(unit.snr(sigma), 1 / sigma**2, rtol=1e-6, atol=0)
    ref = EDMProcess(sigma_data=0.5, snr_reference="sigma_data")
    torch.testing.assert_close(ref.snr(sigma), 0.25 / sigma**2, rtol=1e-6, atol=0)
    assert ref.snr(torch.tensor([0.5])).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(6, 3, generator=g)
    n = torch.randn(6, 3, generator=g)
    torch.testing.assert_close(unit.add_noise(y, n, sigma), y + sigma[:, None] * n)
    a, s = unit.alpha_sigma(sigma)
    torch.testing.assert_close(a, torch.ones(6))
    torch.testing.assert_close(s, sigma)


def test_edm_training_quantile_is_lognormal_cdf():
    p = EDMProcess(P_mean=-1.2, P_std=1.2)
    assert p.training_quantile(torch.tensor([math.exp(-1.2)])).item() == pytest.approx(0.5, abs=1e-6)
    # one std above: Phi(1) = 0.841344746
    assert p.training_quantile(torch.tensor([math.exp(0.0)])).item() == pytest.approx(0.841344746, abs=1e-5)
    levels = p.validation_levels(8)
    q = p.training_quantile(levels)
    torch.testing.assert_close(q, (torch.arange(8) + 0.5) / 8, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(schedule="quadratic"), "schedule"),
        (dict(num_timesteps=1), "num_timesteps"),
        (dict(num_timesteps=0), "num_timesteps"),
    ],
)
def test_vp_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VPProcess(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma_data=0.0), "sigma_data"),
        (dict(sigma_data=-1.0), "sigma_data"),
        (dict(snr_reference="data"), "snr_reference"),
        (dict(P_std=0.0), "P_std"),
        (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    ],
)
def test_edm_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EDMProcess(**kwargs)
