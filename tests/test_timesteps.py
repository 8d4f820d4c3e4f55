"""Training-time noise-level distributions: uniform timesteps, log-normal and uniform sigma."""

import math

import pytest
import torch
from scipy import stats

from conftest import gen
from lightning_diffusion.timesteps import LogNormalSigma, UniformSigma, UniformTimesteps



def ks_distance(samples, cdf):
    """Two-sided Kolmogorov-Smirnov statistic of samples against a CDF (both float64)."""
    x, _ = samples.double().sort()
    n = len(x)
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    lo = torch.arange(0, n, dtype=torch.float64) / n
    return max((hi - f).abs().max().item(), (f - lo).abs().max().item())


def test_uniform_timesteps_cover_range_uniformly():
    T, n = 1000, 200_000
    dist = UniformTimesteps(T)
    t, w = dist.sample(n, generator=gen(0))
    assert t.dtype == torch.int64 and t.shape == (n,)
    assert t.min().item() == 0 and t.max().item() == T - 1
    torch.testing.assert_close(w, torch.ones(n))
    counts = torch.bincount(t, minlength=T).double()
    expected = n / T
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # chi-square with 999 dof: p = 1e-4 threshold ~ 1178; a non-uniform sampler lands far above
    assert chi2 < stats.chi2.ppf(1 - 1e-4, T - 1)
    assert (counts > 0).all()
    # a 10% tilt would be caught: the test is not vacuous
    tilted = torch.cat([t, t[t < 100]])
    counts_t = torch.bincount(tilted, minlength=T).double()
    exp_t = len(tilted) / T
    assert ((counts_t - exp_t) ** 2 / exp_t).sum().item() > stats.chi2.ppf(1 - 1e-4, T - 1)


@pytest.mark.parametrize("num_clusters, stage", [(20, 1), (20, 3), (20, 7), (10, 9), (4, 4)])
def test_uniform_timesteps_restrict_gives_exact_top_slice(num_clusters, stage):
    T = 1000
    dist = UniformTimesteps(T)
    dist.restrict(1 - stage / num_clusters, 1.0)
    t, w = dist.sample(50_000, generator=gen(1))
    first = T - stage * T // num_clusters
    assert t.min().item() == first and t.max().item() == T - 1
    assert torch.unique(t).numel() == T - first  # every timestep of the slice is reached
    torch.testing.assert_close(w, torch.ones(len(w)))


def test_uniform_timesteps_icdf_cdf():
    dist = UniformTimesteps(10)
    u = torch.tensor([0.0, 0.05, 0.0999, 0.1, 0.55, 0.999, 1.0], dtype=torch.float64)
    assert dist.icdf(u).tolist() == [0, 0, 0, 1, 5, 9, 9]
    torch.testing.assert_close(dist.cdf(torch.arange(10)), torch.arange(1, 11, dtype=torch.float64) / 10)


def test_lognormal_moments_and_round_trip():
    dist = LogNormalSigma(P_mean=-1.2, P_std=1.2)
    sigma, w = dist.sample(200_000, generator=gen(2))
    assert sigma.dtype == torch.float32 and (sigma > 0).all()
    torch.testing.assert_close(w, torch.ones(len(w)))
    log_s = sigma.double().log()
    # se of the mean: 1.2/sqrt(2e5) ~ 0.0027; of the std: 1.2/sqrt(4e5) ~ 0.0019
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.015)
    assert log_s.std().item() == pytest.approx(1.2, abs=0.01)
    assert ks_distance(sigma, dist.cdf) < 1.63 / math.sqrt(len(sigma))  # KS critical value at alpha = 1%
    x = torch.tensor([1e-3, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0])
    torch.testing.assert_close(dist.icdf(dist.cdf(x)), x, rtol=1e-5, atol=0)
    u = torch.linspace(0.001, 0.999, 17, dtype=torch.float64)
    torch.testing.assert_close(dist.cdf(dist.icdf(u)), u, rtol=0, atol=1e-6)
    assert dist.cdf(torch.tensor([math.exp(-1.2)])).item() == pytest.approx(0.5)
    # scipy reference for the CDF
    ref = stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf(x.double().numpy())
    torch.testing.assert_close(dist.cdf(x), torch.from_numpy(ref), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(dist.icdf(torch.tensor([0.0, 1.0], dtype=torch.float64))).all()


@pytest.mark.parametrize("u_low, u_high", [(0.7, 1.0), (0.0, 0.25), (0.4, 0.6)])
def test_lognormal_restricted_draws_follow_truncated_density(u_low, u_high):
    dist = LogNormalSigma(P_mean=-0.4, P_std=1.0)
    dist.restrict(u_low, u_high)
    sigma, _ = dist.sample(100_000, generator=gen(3))
    lo, hi = dist.icdf(torch.tensor([u_low, u_high], dtype=torch.float64)).tolist()
    assert sigma.min().item() >= lo * (1 - 1e-5) and sigma.max().item() <= hi * (1 + 1e-5)

    def truncated_cdf(x):
        return ((dist.cdf(x) - u_low) / (u_high - u_low)).clamp(0, 1)

    assert ks_distance(sigma, truncated_cdf) < 1.63 / math.sqrt(len(sigma))
    # and it is NOT the untruncated density
    assert ks_distance(sigma, dist.cdf) > 0.1
    state = dist.state_dict()
    assert state == {"u_low": u_low, "u_high": u_high}


def test_uniform_sigma_log_and_linear():
    lo, hi = 0.002, 80.0
    dist = UniformSigma(lo, hi, log_space=True)
    s, _ = dist.sample(100_000, generator=gen(4))
    assert s.min().item() >= lo * (1 - 1e-6) and s.max().item() <= hi * (1 + 1e-6)
    u = (s.double().log() - math.log(lo)) / (math.log(hi) - math.log(lo))
    assert ks_distance(u, lambda v: v.clamp(0, 1)) < 1.63 / math.sqrt(len(u))
    assert ks_distance(s, dist.cdf) < 1.63 / math.sqrt(len(s))
    # median of a log-uniform is the geometric mean
    assert s.median().item() == pytest.approx(math.sqrt(lo * hi), rel=0.03)
    lin = UniformSigma(lo, hi, log_space=False)
    s2, _ = lin.sample(100_000, generator=gen(5))
    assert s2.mean().item() == pytest.approx((lo + hi) / 2, rel=0.01)
    assert ks_distance(s2, lin.cdf) < 1.63 / math.sqrt(len(s2))
    x = torch.tensor([0.01, 1.0, 50.0])
    for d in (dist, lin):
        torch.testing.assert_close(d.icdf(d.cdf(x)), x, rtol=1e-5, atol=0)


@pytest.mark.parametrize("make", [lambda: UniformTimesteps(1000), lambda: LogNormalSigma(), lambda: UniformSigma()])
def test_same_seed_same_draws(make):
    a, _ = make().sample(64, generator=gen(7))
    b, _ = make().sample(64, generator=gen(7))
    c, _ = make().sample(64, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("make", [lambda: UniformTimesteps(1000), lambda: LogNormalSigma(), lambda: UniformSigma()])
def test_state_dict_round_trip(make):
    d = make()
    d.restrict(0.35, 0.8)
    state = d.state_dict()
    assert all(isinstance(v, (float, int)) for v in state.values())
    e = make()
    assert e.state_dict() == {"u_low": 0.0, "u_high": 1.0}
    e.load_state_dict(state)
    assert e.state_dict() == state
    assert torch.equal(d.sample(256, generator=gen(9))[0], e.sample(256, generator=gen(9))[0])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_timesteps"):
        UniformTimesteps(0)
    with pytest.raises(ValueError, match="P_std"):
        LogNormalSigma(P_std=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        UniformSigma(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="sigma_min"):
        UniformSigma(sigma_min=0.0)
    d = UniformTimesteps(10)
    for lo_hi in ((0.5, 0.5), (0.6, 0.4), (-0.1, 0.5), (0.2, 1.1)):
        with pytest.raises(ValueError, match="restrict"):
            d.restrict(*lo_hi)
    assert d.state_dict() == {"u_low": 0.0, "u_high": 1.0}  # a refused restrict changes nothing
