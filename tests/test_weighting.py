"""Loss weightings (docs/algorithms.md 1): Min-SNR table, x0-space equivalence, related weightings."""

import pytest
import torch

from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.core.precondition import Parametrization, edm_coefficients
from lightning_diffusion.core.weighting import (
    ConstantWeighting,
    EDMWeighting,
    MaxSNRWeighting,
    MinSNRWeighting,
    SNRWeighting,
    SoftMinSNRWeighting,
    TruncatedSNRWeighting,
    min_snr_weight,
)

SNR = torch.tensor([0.0, 1e-6, 0.01, 0.5, 1.0, 4.999, 5.0, 5.001, 20.0, 1e4], dtype=torch.float64)


def mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_table(gamma):
    s = SNR
    w_x0 = min_snr_weight(s, gamma, "x0")
    w_eps = min_snr_weight(s, gamma, "eps")
    w_v = min_snr_weight(s, gamma, "v")
    for w in (w_x0, w_eps, w_v):
        assert w.dtype == torch.float32 and torch.isfinite(w).all()
    m = torch.minimum(s, torch.full_like(s, gamma))
    torch.testing.assert_close(w_x0, m.float())
    pos = s > 0
    torch.testing.assert_close(w_eps[pos], (m[pos] / s[pos]).float())
    torch.testing.assert_close(w_eps, torch.minimum(torch.ones_like(s), gamma / s).float())
    assert w_eps[0].item() == 1.0  # the SNR -> 0 limit
    torch.testing.assert_close(w_v, (m / (s + 1)).float())
    # Hand-checked values at gamma = 5.
    if gamma == 5.0:
        i20 = 8
        assert w_x0[i20].item() == 5.0 and w_eps[i20].item() == pytest.approx(0.25)
        assert w_v[i20].item() == pytest.approx(5 / 21)
        assert w_eps[4].item() == 1.0 and w_v[4].item() == pytest.approx(0.5)


def test_min_snr_class_and_bad_gamma():
    w = MinSNRWeighting(gamma=5.0)
    torch.testing.assert_close(w(SNR.float(), "v"), min_snr_weight(SNR, 5.0, "v"))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="gamma"):
            MinSNRWeighting(gamma=bad)
        with pytest.raises(ValueError, match="gamma"):
            min_snr_weight(SNR, bad, "eps")
    with pytest.raises(ValueError, match="prediction"):
        w(SNR, "score")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_equivalence_in_x0_space(schedule, prediction):
    """w_pred * mse(out_hat, target) == min(SNR, gamma) * mse(x0_hat, x0), per sample."""
    gamma = 5.0
    process = VPProcess(schedule, 1000)
    param = Parametrization(process, prediction)
    g = torch.Generator().manual_seed(3)
    B = 64
    x0 = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (B,), generator=g)
    t[:3] = torch.tensor([0, 999, 500])
    x_t = process.add_noise(x0, eps, t)
    out_hat = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    target = param.target(x0, eps, t)
    x0_hat = param.to_x0(out_hat, x_t, t)
    snr = process.snr(t)
    lhs = min_snr_weight(snr, gamma, prediction).double() * mse(out_hat, target)
    rhs = snr.clamp_max(gamma).double() * mse(x0_hat, x0)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=0)
    # And the same through the generic conversion for every x0-defined weighting.
    for w in (SNRWeighting(), MaxSNRWeighting(2.0), TruncatedSNRWeighting(), SoftMinSNRWeighting(), EDMWeighting()):
        lhs = w(snr, prediction).double() * mse(out_hat, target)
        rhs = w(snr, "x0").double() * mse(x0_hat, x0)
        torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=0)


SD = 0.5
X0_DEFS = {
    "snr": (SNRWeighting(), lambda s: s),
    "min5": (MinSNRWeighting(5.0), lambda s: torch.minimum(s, torch.full_like(s, 5.0))),
    "max2": (MaxSNRWeighting(2.0), lambda s: torch.maximum(s, torch.full_like(s, 2.0))),
    "trunc": (TruncatedSNRWeighting(), lambda s: torch.maximum(s, torch.ones_like(s))),
    "softmin": (SoftMinSNRWeighting(SD), lambda s: 1 / (1 / s + SD**2)),
    "edm": (EDMWeighting(SD), lambda s: (1 / s + SD**2) / (SD**2 / s)),
}


@pytest.mark.parametrize("name", sorted(X0_DEFS))
def test_weightings_follow_x0_definition(name):
    w, w_x0_fn = X0_DEFS[name]
    s = SNR[1:]  # SNR > 0: the definitions use sigma^2 = 1/SNR
    w_x0 = w_x0_fn(s)
    for pred, expected in (("x0", w_x0), ("eps", w_x0 / s), ("v", w_x0 / (s + 1))):
        got = w(s.float(), pred)
        assert got.dtype == torch.float32 and got.shape == s.shape
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=0)
    zero = torch.zeros(3)
    for pred in ("x0", "v", "eps"):
        assert torch.isfinite(w(zero, pred)).all(), pred


def test_weightings_at_zero_snr_limits():
    zero = torch.zeros(2)
    assert (SNRWeighting()(zero, "x0") == 0).all() and (SNRWeighting()(zero, "eps") == 1).all()
    assert (MinSNRWeighting()(zero, "eps") == 1).all() and (MinSNRWeighting()(zero, "v") == 0).all()
    assert (SoftMinSNRWeighting()(zero, "eps") == 1).all() and (SoftMinSNRWeighting()(zero, "x0") == 0).all()
    torch.testing.assert_close(EDMWeighting(0.5)(zero, "x0"), torch.full((2,), 4.0))
    torch.testing.assert_close(EDMWeighting(0.5)(zero, "v"), torch.full((2,), 4.0))
    torch.testing.assert_close(MaxSNRWeighting(3.0)(zero, "v"), torch.full((2,), 3.0))


def test_constant_weighting():
    for pred in ("eps", "x0", "v"):
        w = ConstantWeighting()(SNR, pred)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, torch.ones(len(SNR)))
    with pytest.raises(ValueError, match="prediction"):
        ConstantWeighting()(SNR, "score")


@pytest.mark.parametrize("cls", [MaxSNRWeighting, SoftMinSNRWeighting, EDMWeighting])
def test_bad_arguments_raise(cls):
    with pytest.raises(ValueError, match="k" if cls is MaxSNRWeighting else "sigma_data"):
        cls(0.0)


def test_edm_lambda():
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    snr = EDMProcess(sigma_data=SD).snr(sigma)
    lam = (sigma**2 + SD**2) / (sigma * SD) ** 2
    torch.testing.assert_close(EDMWeighting(SD)(snr, "x0").double(), lam, rtol=1e-5, atol=0)
    _, c_out, _, _ = edm_coefficients(sigma, SD)
    torch.testing.assert_close(lam, 1 / c_out.double() ** 2, rtol=1e-5, atol=0)


class RandomF(torch.nn.Module):
    """A 'network' whose raw output F is a fixed random tensor."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, c_noise, class_labels=None):
        return self.f


def test_edm_f_space_equivalence():
    """min(SNR,g) * mse(D, y) == min(SNR,g) * c_out^2 * mse(F, F_target); EDM lambda makes F unweighted."""
    gamma = 5.0
    process = EDMProcess(sigma_data=SD)
    param = Parametrization(process, "x0")
    g = torch.Generator().manual_seed(4)
    B = 32
    y = SD * torch.randn(B, 2, 4, 4, generator=g)
    n = torch.randn(B, 2, 4, 4, generator=g)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B, generator=g))
    x = process.add_noise(y, n, sigma)
    f = torch.randn(B, 2, 4, 4, generator=g)
    D = param.predict(RandomF(f), x, sigma)
    c_skip, c_out, _, _ = edm_coefficients(sigma, SD)
    cs, co = c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)
    f_target = (y - cs * x) / co
    snr = process.snr(sigma)
    w_d = min_snr_weight(snr, gamma, "x0")
    lhs = w_d * mse(D, y)
    rhs = w_d * c_out**2 * mse(f, f_target)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(EDMWeighting(SD)(snr, "x0") * mse(D, y), mse(f, f_target), rtol=1e-4, atol=1e-7)
