"""Rectified flow, its densities over t, offset noise and input perturbation: each formula against a
direct computation (docs/algorithms.md 6)."""

import math

import pytest
import torch

from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.core.noise import EDMProcess, RectifiedFlowProcess, VPProcess
from lightning_diffusion.core.perturb import training_noise
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.solvers import flow_euler, flow_heun, flow_times
from lightning_diffusion.core.weighting import (ConstantWeighting, EDMWeighting, MinSNRWeighting, SNRWeighting,
                                                SoftMinSNRWeighting, min_snr_weight)
from lightning_diffusion.networks import UNet
from lightning_diffusion.timesteps import (LogitNormalTimesteps, LogNormalSigma, ModeTimesteps, ShiftedTimesteps,
                                           UniformTimesteps)
from lightning_diffusion.timesteps.defaults import check_timesteps, default_timesteps

torch.set_default_dtype(torch.float32)


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 4, 4, generator=g)
    eps = torch.randn(n, 3, 4, 4, generator=g)
    t = torch.rand(n, generator=g) * 0.98 + 0.01
    return x0, eps, t


# ----------------------------------------------------------------------------- the process
def test_path_velocity_target_and_snr():
    x0, eps, t = _batch()
    process, param = RectifiedFlowProcess(), Parametrization(RectifiedFlowProcess(), "flow")
    tt = t[:, None, None, None]
    assert torch.allclose(process.add_noise(x0, eps, t), (1 - tt) * x0 + tt * eps)
    assert torch.equal(param.target(x0, eps, t), eps - x0)
    assert torch.allclose(process.snr(t), ((1 - t) / t) ** 2)
    a, s = process.alpha_sigma(t)
    assert torch.allclose(a, 1 - t) and torch.allclose(s, t)
    # VE form: x_t / (1 - t) = x0 + sigma eps with sigma = t / (1 - t), so SNR = 1 / sigma^2.
    a_ve, sigma = process.scale_and_sigma(t)
    assert torch.allclose(process.add_noise(x0, eps, t) / a_ve[:, None, None, None], x0 + sigma[:, None, None, None] * eps,
                          atol=1e-5)
    assert torch.allclose(process.snr(t), sigma ** -2, rtol=1e-4)
    assert process.snr(torch.tensor([1.0])).item() == 0.0 and math.isfinite(process.snr(torch.tensor([0.0])).item())


def test_exact_velocity_recovers_x0_and_eps():
    x0, eps, t = _batch()
    param = Parametrization(RectifiedFlowProcess(), "flow")
    x_t = RectifiedFlowProcess().add_noise(x0, eps, t)
    u = eps - x0
    assert torch.allclose(param.to_x0(u, x_t, t), x0, atol=1e-5)  # x0 = x_t - t u
    assert torch.allclose(param.to_eps(u, x_t, t), eps, atol=1e-5)  # eps = x_t + (1 - t) u
    # STF's x0 estimate becomes the velocity target (x_t - x0*) / t.
    x0_star = x0 + 0.1 * torch.randn_like(x0)
    tt = t[:, None, None, None]
    assert torch.allclose(param.target_from_x0(x0_star, x_t, t), (x_t - x0_star) / tt, atol=1e-4)


def test_the_network_sees_1000_t():
    seen = {}

    def net(x, level, labels=None):
        seen["level"] = level
        return torch.zeros_like(x)

    x0, eps, t = _batch(8)
    Parametrization(RectifiedFlowProcess(), "flow").predict(net, x0, t)
    assert torch.allclose(seen["level"], 1000 * t)


def test_predictions_fit_their_process():
    with pytest.raises(ValueError, match="does not fit RectifiedFlowProcess.*use prediction='flow'"):
        Parametrization(RectifiedFlowProcess(), "v")
    with pytest.raises(ValueError, match="prediction='flow' .* needs process: RectifiedFlowProcess"):
        Parametrization(VPProcess(), "flow")
    with pytest.raises(ValueError, match="does not fit EDMProcess"):
        Parametrization(EDMProcess(), "flow")


# ----------------------------------------------------------------------------- weightings in velocity space
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_in_velocity_space_is_min_snr_gamma_times_the_x0_error(gamma):
    """weight_flow * ||u_hat - u||^2 == min(SNR, gamma) * ||x0_hat - x0||^2, for any network output."""
    x0, eps, t = _batch(256, seed=1)
    process = RectifiedFlowProcess()
    param = Parametrization(process, "flow")
    x_t = process.add_noise(x0, eps, t)
    u_hat = eps - x0 + 0.3 * torch.randn_like(x0)
    mse_u = (u_hat - param.target(x0, eps, t)).square().flatten(1).mean(1)
    mse_x0 = (param.to_x0(u_hat, x_t, t) - x0).square().flatten(1).mean(1)
    snr = process.snr(t)
    lhs = MinSNRWeighting(gamma)(snr, "flow") * mse_u
    assert torch.allclose(lhs, torch.minimum(snr, torch.tensor(gamma)) * mse_x0, rtol=1e-4, atol=1e-7)
    # The closed form of docs/algorithms.md 6: min((1 - t)^2, gamma t^2).
    assert torch.allclose(min_snr_weight(snr, gamma, "flow"), torch.minimum((1 - t) ** 2, gamma * t**2), rtol=1e-5)


@pytest.mark.parametrize("weighting", [SNRWeighting(), EDMWeighting(), SoftMinSNRWeighting()])
def test_every_x0_space_weighting_converts_to_velocity_space(weighting):
    x0, eps, t = _batch(128, seed=2)
    process = RectifiedFlowProcess()
    weighting.bind(process) if hasattr(weighting, "bind") else None
    snr = process.snr(t)
    w_x0, w_flow = weighting(snr, "x0"), weighting(snr, "flow")
    assert torch.allclose(w_flow, w_x0 * t**2, rtol=1e-4)  # x0_hat - x0 = -t (u_hat - u)
    assert torch.equal(ConstantWeighting()(snr, "flow"), torch.ones_like(t))
    ends = weighting(process.snr(torch.tensor([0.0, 1.0])), "flow")
    assert torch.isfinite(ends).all()  # t = 0 (SNR huge) and t = 1 (SNR 0) stay finite


# ----------------------------------------------------------------------------- densities over t
def _std_normal_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def test_logit_normal_cdf_icdf_and_samples():
    dist = LogitNormalTimesteps(mean=0.3, std=0.8)
    u = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    t = dist.icdf(u).double()
    assert torch.allclose(dist.cdf(t), u, atol=1e-6)
    assert torch.allclose(dist.cdf(t), _std_normal_cdf((torch.log(t / (1 - t)) - 0.3) / 0.8), atol=1e-12)
    draws, weight = dist.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weight, torch.ones(200_000))
    logits = torch.log(draws / (1 - draws)).double()
    assert abs(logits.mean() - 0.3) < 0.01 and abs(logits.std() - 0.8) < 0.01
    assert 0 < draws.min() and draws.max() < 1


def test_mode_density_inverts_and_is_uniform_at_scale_zero():
    dist = ModeTimesteps(scale=1.29)
    u = torch.linspace(0, 1, 201, dtype=torch.float64)
    t = dist.icdf(u).double()
    assert t[0] == 0 and t[-1] == 1 and (t.diff() > 0).all()
    assert torch.allclose(dist.cdf(t), u, atol=1e-6)
    f = lambda v: 1 - v - 1.29 * (torch.cos(math.pi / 2 * v) ** 2 - 1 + v)  # noqa: E731 - SD3's formula
    assert torch.allclose(t, f(1 - u), atol=1e-6)
    uniform = ModeTimesteps(scale=0.0)
    assert torch.allclose(uniform.icdf(u).double(), u, atol=1e-7)


def test_shift_is_the_identity_at_one_and_composes_cdf_and_icdf():
    base = LogitNormalTimesteps()
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.allclose(ShiftedTimesteps(base, shift=1.0).icdf(u), base.icdf(u))
    shifted = ShiftedTimesteps(base, image_size=1024, base_size=256)
    assert shifted.shift == 4.0
    t = base.icdf(u).double()
    assert torch.allclose(shifted.icdf(u).double(), 4 * t / (1 + 3 * t), atol=1e-6)
    assert torch.allclose(shifted.cdf(shifted.icdf(u).double()), u, atol=1e-5)
    assert (shifted.icdf(u) >= base.icdf(u)).all()  # s > 1 moves every quantile towards noise
    draws, _ = ShiftedTimesteps(ModeTimesteps(0.0), shift=3.0).sample(100_000, generator=torch.Generator().manual_seed(1))
    # Uniform t shifted by 3: P(t' <= 0.5) = P(t <= 0.5 / (3 - 2 * 0.5)) = 0.25.
    assert abs((draws <= 0.5).float().mean() - 0.25) < 0.005


def test_restriction_is_exact_through_the_shift():
    dist = ShiftedTimesteps(LogitNormalTimesteps(), shift=2.0)
    dist.restrict(0.75, 1.0)
    draws, _ = dist.sample(10_000, generator=torch.Generator().manual_seed(2))
    assert (dist.cdf(draws.double()) >= 0.75 - 1e-6).all()
    assert draws.min() >= dist.icdf(torch.tensor([0.75], dtype=torch.float64)).item() - 1e-6


def test_default_density_and_level_kinds():
    assert isinstance(default_timesteps(RectifiedFlowProcess()), LogitNormalTimesteps)
    check_timesteps(ShiftedTimesteps(ModeTimesteps(), shift=2.0), RectifiedFlowProcess())
    with pytest.raises(ValueError, match="LogNormalSigma draws continuous sigma, but RectifiedFlowProcess needs the "
                                         "flow time t"):
        check_timesteps(LogNormalSigma(), RectifiedFlowProcess())
    with pytest.raises(ValueError, match="LogitNormalTimesteps draws the flow time t in \\[0, 1\\], but EDMProcess"):
        check_timesteps(LogitNormalTimesteps(), EDMProcess())
    with pytest.raises(ValueError, match="but VPProcess needs discrete timesteps"):
        check_timesteps(LogitNormalTimesteps(), VPProcess())
    with pytest.raises(ValueError, match="ShiftedTimesteps.base needs a density over the flow time t"):
        ShiftedTimesteps(UniformTimesteps(), shift=2.0)


@pytest.mark.parametrize("make, message", [
    (lambda: RectifiedFlowProcess(t_min=-0.1), "RectifiedFlowProcess needs 0 < t_min < t_max < 1"),
    (lambda: RectifiedFlowProcess(t_max=1.5), "RectifiedFlowProcess needs 0 < t_min < t_max < 1"),
    (lambda: LogitNormalTimesteps(std=0.0), r"LogitNormalTimesteps.std=0.0 must be > 0"),
    (lambda: ShiftedTimesteps(LogitNormalTimesteps(), shift=0.0), r"ShiftedTimesteps.shift=0.0 must be > 0"),
    (lambda: ShiftedTimesteps(LogitNormalTimesteps(), shift=-2.0), r"ShiftedTimesteps.shift=-2.0 must be > 0"),
    (lambda: ShiftedTimesteps(LogitNormalTimesteps()), "needs shift, or image_size and base_size"),
    (lambda: ModeTimesteps(scale=2.0), r"ModeTimesteps.scale=2.0 must be in \[-1"),
    (lambda: DiffusionLightningModule(UNet(model_channels=8), offset_noise=-0.1), "offset_noise=-0.1 must be"),
    (lambda: DiffusionLightningModule(UNet(model_channels=8), input_perturbation=float("inf")),
     "input_perturbation=inf must be"),
])
def test_bad_settings_stop_in_one_sentence(make, message):
    with pytest.raises(ValueError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- sampling
def _mixture():
    """A 2-D Gaussian mixture of isotropic components: its exact flow velocity field."""
    mus = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    stds = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    def velocity(x, t):
        # x_t | k ~ N((1 - t) mu_k, ((1 - t)^2 s_k^2 + t^2) I); E[x0 | x_t, k] by Gaussian conditioning.
        x, t = x.double(), t.double()[:, None, None]
        a, var = 1 - t, (1 - t) ** 2 * stds[None, :, None] ** 2 + t**2
        diff = x[:, None, :] - a * mus[None]
        log_r = torch.log(weights)[None] - (diff.square().sum(-1) / var[..., 0] + 2 * torch.log(var[..., 0])) / 2
        r = torch.softmax(log_r, dim=1)
        x0_k = mus[None] + (a * stds[None, :, None] ** 2 / var) * diff
        x0 = (r[..., None] * x0_k).sum(1)
        t = t[:, :, 0]
        eps = (x - a[:, :, 0] * x0) / t.clamp_min(1e-12)  # t = 1 start: eps = x_t exactly
        return (eps - x0).float()

    return mus, stds, weights, velocity


@pytest.mark.parametrize("solver, steps", [(flow_euler, 200), (flow_heun, 60)])
def test_the_flow_ode_turns_the_exact_velocity_into_mixture_samples(solver, steps):
    mus, stds, weights, velocity = _mixture()
    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0))
    samples = solver(velocity, x, flow_times(steps)).double()
    nearest = torch.cdist(samples, mus).argmin(1)
    fractions = torch.bincount(nearest, minlength=3).double() / len(samples)
    assert torch.allclose(fractions, weights, atol=0.015), fractions
    for k in range(3):
        cluster = samples[nearest == k]
        assert torch.allclose(cluster.mean(0), mus[k], atol=0.05)
        assert abs(cluster.std(0).mean() - stds[k]) < 0.05


def test_flow_times_grid():
    grid = flow_times(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = flow_times(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > grid[1:-1]).all()


# ----------------------------------------------------------------------------- offset noise, input perturbation
def test_offset_noise_adds_one_offset_per_sample_and_channel():
    x0 = torch.zeros(4000, 3, 8, 8)
    noise, input_noise = training_noise(x0, torch.Generator().manual_seed(0), offset_noise=0.5)
    assert input_noise is None
    channel_means = noise.mean(dim=(2, 3))
    # Var(mean over 64 pixels) = 1/64 + c^2 = 0.265625 with c = 0.5 (0.015625 without offset).
    assert abs(channel_means.var() - (1 / 64 + 0.25)) < 0.01
    plain, _ = training_noise(x0, torch.Generator().manual_seed(0))
    assert abs(plain.mean(dim=(2, 3)).var() - 1 / 64) < 0.002


def test_input_perturbation_changes_the_input_not_the_target():
    x0 = torch.zeros(4000, 1, 8, 8)
    noise, input_noise = training_noise(x0, torch.Generator().manual_seed(0), input_perturbation=0.1)
    xi = (input_noise - noise) / 0.1
    assert abs(xi.std() - 1) < 0.01 and abs((xi * noise).mean()) < 0.01  # fresh, independent noise
    same, none = training_noise(x0, torch.Generator().manual_seed(0))
    assert none is None and torch.equal(same, noise)  # the target noise does not change with it
