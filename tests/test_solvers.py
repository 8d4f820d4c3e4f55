"""Generation solvers on Gaussian data, where the exact denoiser is known in closed form.

Data y ~ N(MU, S^2) per dimension. In VE space x = y + sigma n the exact denoiser is
D(x; sigma) = MU + S^2/(S^2 + sigma^2) (x - MU), and the probability-flow ODE is linear:
x(0) - MU = (x(sigma_max) - MU) * S / sqrt(S^2 + sigma_max^2). Samples are N x DIM = 65536 values,
so the standard error of the mean is S/256 ~ 0.002 and of the std S/sqrt(2 * 65536) ~ 0.0014;
tolerances below are those plus the discretization error of each solver at its step count.
"""

import math

import pytest
import torch

from lightning_diffusion.core.noise import VPProcess
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.solvers import ddim, euler, heun, karras_sigmas
from lightning_diffusion.sampling import DiffusionSampler

MU, S = 0.3, 0.5
N, DIM = 4096, 16


def exact_denoiser(x, sigma):
    sg = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + S**2 / (S**2 + sg**2) * (x - MU)


def start(seed=0, sigma_max=80.0):
    return sigma_max * torch.randn(N, DIM, generator=torch.Generator().manual_seed(seed))


def test_karras_sigmas_grid():
    sig = karras_sigmas(32, 0.002, 80.0)
    assert sig.dtype == torch.float64 and sig.shape == (33,)
    assert sig[0].item() == pytest.approx(80.0, rel=1e-12)
    assert sig[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert sig[-1].item() == 0.0
    assert (sig[1:] < sig[:-1]).all()
    # eq. 5: sigma_i^(1/rho) is linear in i
    r = sig[:-1] ** (1 / 7)
    torch.testing.assert_close(r[1:] - r[:-1], torch.full((31,), (r[-1] - r[0]).item() / 31, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0, 0.002, 80.0)


@pytest.mark.parametrize(
    "solver, steps, tol_std",
    [(heun, 32, 0.0125), (euler, 256, 0.0125)],  # heun@32: ~1.5% bias, euler@256: ~1.2% bias (first order)
)
def test_deterministic_solvers_recover_gaussian(solver, steps, tol_std):
    x = start()
    out = solver(exact_denoiser, x, karras_sigmas(steps, 0.002, 80.0))
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, abs=tol_std)
    # The flow is affine per element: out = MU + c (x - MU), c ~ S / sqrt(S^2 + 80^2).
    far = (x - MU).abs() > 1.0  # avoid float32 cancellation near the fixed point
    c = (out[far] - MU) / (x[far] - MU)
    assert c.std().item() < 1e-3 * c.mean().item()
    assert c.mean().item() == pytest.approx(S / math.hypot(S, 80.0), rel=0.025)


def test_heun_beats_euler_at_equal_steps():
    exact = S / math.hypot(S, 80.0)
    x = torch.ones(1, 1)
    sig = karras_sigmas(16, 0.002, 80.0)
    err_h = abs((heun(exact_denoiser, x, sig) - MU).item() / (1 - MU) - exact)
    err_e = abs((euler(exact_denoiser, x, sig) - MU).item() / (1 - MU) - exact)
    assert err_h < 0.5 * err_e


def test_ddim_eta0_equals_euler():
    sig = karras_sigmas(32, 0.002, 80.0)
    x = start(1)
    torch.testing.assert_close(ddim(exact_denoiser, x, sig, eta=0.0), euler(exact_denoiser, x, sig), rtol=1e-5, atol=1e-5)


def ddim_chain_moments(sig, eta, m0, v0):
    """Exact mean/variance of the discrete DDIM chain with the Gaussian denoiser (independent recurrence)."""
    m, v = m0 - MU, v0
    for i in range(len(sig) - 1):
        s0, s1 = float(sig[i]), float(sig[i + 1])
        k = S**2 / (S**2 + s0**2)
        up2 = eta**2 * s1**2 * (s0**2 - s1**2) / s0**2
        down = math.sqrt(max(s1**2 - up2, 0.0))
        slope = k + down / s0 * (1 - k)
        m, v = slope * m, slope**2 * v + up2
    return m + MU, v


def test_ddim_eta1_is_ancestral_and_recovers_gaussian():
    x = start(2)
    # Coarse grid: the chain loses variance (point-estimate x0); compare to its exact moments.
    sig = karras_sigmas(32, 0.002, 80.0)
    out = ddim(exact_denoiser, x, sig, generator=torch.Generator().manual_seed(3), eta=1.0)
    m_ref, v_ref = ddim_chain_moments(sig, 1.0, x.mean().item(), x.var().item())
    assert out.mean().item() == pytest.approx(m_ref, abs=0.01)
    assert out.var().item() == pytest.approx(v_ref, rel=0.03)  # se of a variance: sqrt(2/65536) ~ 0.6%
    # The ancestral noise was actually injected: differs from eta = 0 and varies with the seed.
    out_b = ddim(exact_denoiser, x, sig, generator=torch.Generator().manual_seed(4), eta=1.0)
    assert (out - out_b).abs().max().item() > 0.1
    # Fine grid: recovers the data distribution (~2% low at 256 steps).
    sig = karras_sigmas(256, 0.002, 80.0)
    out = ddim(exact_denoiser, x, sig, generator=torch.Generator().manual_seed(5), eta=1.0)
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, abs=0.02)


def test_heun_churn_still_recovers_gaussian():
    sig = karras_sigmas(64, 0.002, 80.0)
    out = heun(exact_denoiser, start(6), sig, generator=torch.Generator().manual_seed(7), churn=10.0)
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, abs=0.02)


class ExactVPEpsNet(torch.nn.Module):
    """Exact eps-prediction for Gaussian data under a VP process; records the timesteps it is called at."""

    def __init__(self, process):
        super().__init__()
        self.process = process
        self.calls = []

    def forward(self, x_t, t, class_labels=None):
        assert torch.equal(t, t.round())  # the sampler calls the net at integer timesteps
        self.calls.append(int(t[0]))
        abar = self.process.alphas_cumprod[t.long()].view(-1, *([1] * (x_t.ndim - 1)))
        a, st = abar.sqrt(), (1 - abar).sqrt()
        x0_hat = MU + a * S**2 / (a**2 * S**2 + st**2) * (x_t.double() - a * MU)
        return ((x_t.double() - a * x0_hat) / st).float()


def vp_reference(process, sig, x):
    """Deterministic DDIM chain on the sampler's grid: elementwise MU + prod(slopes) (x - MU)."""
    c = 1.0
    for i in range(len(sig) - 1):
        s0, s1 = float(sig[i]), float(sig[i + 1])
        k = S**2 / (S**2 + s0**2)
        c *= k + s1 / s0 * (1 - k)
    return MU + c * (x - MU)


def grid_timesteps(process, sig):
    """The trained timesteps behind a VP sigma grid; every grid sigma must be one of them exactly."""
    abar = process.alphas_cumprod
    table = ((1 - abar) / abar).sqrt()
    t = (sig[:-1, None] == table[None]).double().argmax(1)
    torch.testing.assert_close(table[t], sig[:-1], rtol=0, atol=0)
    return t


def check_vp_grid(process, sig, num_steps):
    assert sig.dtype == torch.float64 and sig[-1].item() == 0.0
    assert torch.isfinite(sig).all() and (sig[1:] < sig[:-1]).all()
    assert 2 <= len(sig) - 1 <= num_steps
    t = grid_timesteps(process, sig)
    assert t[-1].item() == 0  # the chain ends at the least noisy trained step
    return t


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusion_sampler_vp_ddim(schedule):
    process = VPProcess(schedule, 1000)
    sampler = DiffusionSampler(Parametrization(process, "eps"), num_steps=50, solver="ddim")
    sig = sampler.sigmas(50)
    grid_t = check_vp_grid(process, sig, 50)
    net = ExactVPEpsNet(process)
    out = sampler.sample(net, N, (DIM,), "cpu", generator=torch.Generator().manual_seed(8))
    assert net.calls == grid_t.tolist()  # nearest-timestep lookup is exact on the grid
    x_init = float(sig[0]) * torch.randn(N, DIM, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(out, vp_reference(process, sig, x_init).float(), rtol=1e-3, atol=1e-3)
    # DDIM@50 is first order; its bias on this data is a few % of the std (uniform-t grid: ~6%).
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, abs=0.035)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusion_sampler_vp_heun(schedule):
    process = VPProcess(schedule, 1000)
    sampler = DiffusionSampler(Parametrization(process, "eps"), num_steps=50, solver="heun")
    out = sampler.sample(ExactVPEpsNet(process), N, (DIM,), "cpu", generator=torch.Generator().manual_seed(9))
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, abs=0.0125)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_diffusion_sampler_zero_terminal_snr_grid_is_finite(prediction):
    process = VPProcess("linear", 1000, zero_terminal_snr=True)
    sampler = DiffusionSampler(Parametrization(process, prediction), num_steps=50, solver="ddim")
    t = check_vp_grid(process, sampler.sigmas(50), 50)
    assert t[0].item() < 999  # never starts at the sigma = inf terminal step

def test_bad_solver_and_steps():
    param = Parametrization(VPProcess(), "eps")
    with pytest.raises(ValueError, match="sample_solver"):
        DiffusionSampler(param, solver="rk4")
    with pytest.raises(ValueError, match="sample_steps"):
        DiffusionSampler(param, num_steps=0)
    sampler = DiffusionSampler(param, num_steps=4)
    with pytest.raises(ValueError, match="sample_solver"):
        sampler.sample(ExactVPEpsNet(param.process), 2, (3,), "cpu", solver="nope")
