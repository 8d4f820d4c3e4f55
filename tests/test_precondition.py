"""EDM preconditioning and the eps / x0 / v parametrizations (docs/algorithms.md 0)."""

import math

import pytest
import torch

from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.core.precondition import Parametrization, edm_coefficients
from lightning_diffusion.core.targets import StandardTarget

SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0], dtype=torch.float64)


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_edm_coefficients_formulas(sd):
    c_skip, c_out, c_in, c_noise = edm_coefficients(SIGMAS, sd)
    s = SIGMAS
    kw = dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(c_skip.double(), sd**2 / (s**2 + sd**2), **kw)
    torch.testing.assert_close(c_out.double(), s * sd / (s**2 + sd**2).sqrt(), **kw)
    torch.testing.assert_close(c_in.double(), 1 / (s**2 + sd**2).sqrt(), **kw)
    torch.testing.assert_close(c_noise.double(), s.log() / 4, rtol=1e-6, atol=1e-7)
    # EDM lambda = (sigma^2 + sd^2)/(sigma sd)^2 = 1/c_out^2
    torch.testing.assert_close(1 / c_out.double() ** 2, (s**2 + sd**2) / (s * sd) ** 2, rtol=1e-5, atol=0)
    # Identity: c_skip^2 sigma^2 + (1 - c_skip)^2 sd^2 = c_out^2 (the F target has unit variance)
    lhs = c_skip.double() ** 2 * s**2 + (1 - c_skip.double()) ** 2 * sd**2
    torch.testing.assert_close(lhs, c_out.double() ** 2, rtol=1e-5, atol=0)
    # Known value at sigma = sd: c_skip = 1/2, c_out = sd/sqrt 2, c_in = 1/(sd sqrt 2)
    cs, co, ci, _ = edm_coefficients(torch.tensor([sd]), sd)
    assert cs.item() == pytest.approx(0.5) and co.item() == pytest.approx(sd / math.sqrt(2))
    assert ci.item() == pytest.approx(1 / (sd * math.sqrt(2)))


def test_edm_input_and_target_have_unit_variance():
    """For y ~ N(0, sd^2): Var[c_in x] = 1 and Var[(y - c_skip x)/c_out] = 1 at every sigma."""
    sd = 0.5
    g = torch.Generator().manual_seed(5)
    N = 200_000
    y = sd * torch.randn(N, generator=g, dtype=torch.float64)
    n = torch.randn(N, generator=g, dtype=torch.float64)
    for sigma in (0.01, 0.3, 1.0, 5.0, 80.0):
        c_skip, c_out, c_in, _ = (c.double() for c in edm_coefficients(torch.tensor(sigma), sd))
        x = y + sigma * n
        f_target = (y - c_skip * x) / c_out
        # standard error of a variance estimate: sqrt(2/N) ~ 0.003; allow 5 se
        assert f_target.var().item() == pytest.approx(1.0, abs=0.016), sigma
        assert (c_in * x).var().item() == pytest.approx(1.0, abs=0.016), sigma


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_vp_round_trips(schedule, prediction):
    process = VPProcess(schedule, 1000)
    param = Parametrization(process, prediction)
    g = torch.Generator().manual_seed(6)
    B = 16
    x0 = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 990, (B,), generator=g)  # away from the last steps, where to_x0 for eps divides by ~0
    t[0] = 0
    x_t = process.add_noise(x0, eps, t)
    target = param.target(x0, eps, t)
    a, s = (v.double().view(-1, 1, 1, 1) for v in process.alpha_sigma(t))
    expected = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(StandardTarget()(param, x0, eps, x_t, t), expected)
    # The exact target maps back to the true x0 and eps.
    torch.testing.assert_close(param.to_x0(target, x_t, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(param.to_eps(target, x_t, t), eps, rtol=1e-4, atol=1e-4)
    # target_from_x0 with the true x0 reproduces the standard target.
    torch.testing.assert_close(param.target_from_x0(x0, x_t, t), expected, rtol=1e-4, atol=1e-4)
    # Round trip of an arbitrary output: out -> x0_hat -> target_from_x0 -> out.
    out = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    x0_hat = param.to_x0(out, x_t, t)
    torch.testing.assert_close(param.target_from_x0(x0_hat, x_t, t), out, rtol=1e-4, atol=1e-4)


def test_v_definition_and_inverse():
    process = VPProcess("cosine", 1000)
    param = Parametrization(process, "v")
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 300, 600, 900, 998, 999])
    abar = process.alphas_cumprod[t].view(-1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    torch.testing.assert_close(param.target(x0, eps, t), v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(param.to_x0(v, x_t, t), a * x_t - s * v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(param.to_x0(v, x_t, t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(param.to_eps(v, x_t, t), eps, rtol=1e-5, atol=1e-5)


def test_v_prediction_is_finite_at_zero_terminal_snr():
    process = VPProcess("linear", 1000, zero_terminal_snr=True)
    param = Parametrization(process, "v")
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(2, 4, generator=g)
    eps = torch.randn(2, 4, generator=g)
    t = torch.full((2,), 999)
    x_t = process.add_noise(x0, eps, t)
    v = param.target(x0, eps, t)
    torch.testing.assert_close(v, -x0)  # a = 0, s = 1
    torch.testing.assert_close(param.to_x0(v, x_t, t), x0)


class ConstNet(torch.nn.Module):
    def __init__(self, value=0.0):
        super().__init__()
        self.value = value
        self.seen = None

    def forward(self, x, noise_level, class_labels=None):
        self.seen = (x.clone(), noise_level.clone())
        return torch.full_like(x, self.value)


def test_edm_zero_net_gives_c_skip_x_and_feeds_preconditioned_input():
    sd = 0.5
    param = Parametrization(EDMProcess(sigma_data=sd), "x0")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 2, 3, 3, generator=g)
    sigma = torch.tensor([0.01, 0.5, 2.0, 50.0])
    net = ConstNet(0.0)
    d = param.predict(net, x, sigma)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sd)
    torch.testing.assert_close(d, c_skip.view(-1, 1, 1, 1) * x)
    torch.testing.assert_close(net.seen[0], c_in.view(-1, 1, 1, 1) * x)
    torch.testing.assert_close(net.seen[1], sigma.log() / 4)
    d1 = param.predict(ConstNet(1.0), x, sigma)
    torch.testing.assert_close(d1, c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1))
    # EDM target is the clean image, to_x0 is the identity.
    y = torch.randn(4, 2, 3, 3, generator=g)
    torch.testing.assert_close(param.target(y, torch.randn_like(y), sigma), y)
    torch.testing.assert_close(param.to_x0(d, x, sigma), d)


def test_vp_predict_passes_timestep():
    param = Parametrization(VPProcess(), "eps")
    net = ConstNet(0.25)
    x = torch.zeros(3, 2)
    out = param.predict(net, x, torch.tensor([0, 5, 999]))
    torch.testing.assert_close(out, torch.full((3, 2), 0.25))
    torch.testing.assert_close(net.seen[1], torch.tensor([0.0, 5.0, 999.0]))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_edm_rejects_non_x0_prediction(prediction):
    with pytest.raises(ValueError, match="prediction"):
        Parametrization(EDMProcess(), prediction)


def test_unknown_prediction_rejected():
    with pytest.raises(ValueError, match="prediction"):
        Parametrization(VPProcess(), "score")
