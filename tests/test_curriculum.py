"""Timestep curriculum math (docs/algorithms.md 5.3): clusters, exact stage supports, pacers, state."""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
from scipy import stats

from conftest import gen
from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.timesteps import LogNormalSigma, UniformSigma, UniformTimesteps
from lightning_diffusion.timesteps.curriculum import (
    FixedPacer, PatiencePacer, cluster_bounds, discrete_bounds, log_snr_discrete_bounds, stage_support,
)



def ks_distance(samples: torch.Tensor, cdf) -> float:
    x, _ = samples.double().sort()
    n = len(x)
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    lo = torch.arange(0, n, dtype=torch.float64) / n
    return max((hi - f).abs().max().item(), (f - lo).abs().max().item())


def clusters_of(edges: list[int]) -> list[list[int]]:
    return [list(range(a, b)) for a, b in zip(edges, edges[1:])]


# ---------------------------------------------------------------------- partitions
@pytest.mark.parametrize("T, N", [(1000, 20), (1000, 3), (7, 7), (999, 20), (10, 1)])
def test_uniform_partition_covers_every_timestep_once(T, N):
    edges = discrete_bounds(T, N)
    flat = [t for cluster in clusters_of(edges) for t in cluster]
    assert flat == list(range(T))  # every t once, in order
    sizes = [len(c) for c in clusters_of(edges)]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1  # equal widths up to one step


@pytest.mark.parametrize("process", [VPProcess("linear", 1000), VPProcess("cosine", 1000),
                                     VPProcess("cosine", 1000, zero_terminal_snr=True), VPProcess("linear", 50)])
def test_log_snr_partition_is_equal_log_snr_width_and_covers_once(process):
    N = 20
    u, levels = cluster_bounds(process, N, "log_snr")
    edges = [int(b) for b in levels]
    assert [t for c in clusters_of(edges) for t in c] == list(range(process.num_timesteps))
    assert all(len(c) >= 1 for c in clusters_of(edges))
    assert u == [b / process.num_timesteps for b in edges]
    log_snr = process.snr(torch.arange(process.num_timesteps)).double().log()
    finite = log_snr[torch.isfinite(log_snr)]
    hi, lo = finite[0].item(), finite[-1].item()
    exact = 0
    for k in range(1, N):
        level = hi - k * (hi - lo) / N
        # edge k splits log-SNR above level from log-SNR at or below it (unless pushed apart)
        if log_snr[edges[k] - 1] > level >= log_snr[edges[k]]:
            exact += 1
        else:
            assert edges[k] - edges[k - 1] == 1 or edges[k + 1] - edges[k] == 1  # a pushed edge
    assert exact >= N // 2
    # log-SNR clusters are not the uniform ones: the schedule's log-SNR is not linear in t
    assert edges != discrete_bounds(process.num_timesteps, N)


def test_log_snr_pushes_apart_empty_intervals():
    # log-SNR drops by 10 in the first two steps, then slowly: equal spacing leaves empty intervals.
    log_snr = torch.cat([torch.tensor([10.0, 0.0]), torch.linspace(-0.1, -1.0, 8)])
    edges = log_snr_discrete_bounds(log_snr, 5)
    assert edges[0] == 0 and edges[-1] == 10
    assert all(b - a >= 1 for a, b in zip(edges, edges[1:]))


def test_lognormal_quantile_edges_are_normal_quantiles():
    P_mean, P_std, N = -1.2, 1.2, 20
    process = EDMProcess(P_mean=P_mean, P_std=P_std)
    u, sigma = cluster_bounds(process, N, "quantile", base=LogNormalSigma(P_mean, P_std))
    assert u == [k / N for k in range(N + 1)]
    expected = [math.exp(P_mean + P_std * stats.norm.ppf(k / N)) for k in range(1, N)]
    assert sigma[1:-1] == pytest.approx(expected, rel=1e-5)
    assert sigma[0] == 0.0 and sigma[-1] == math.inf


def test_log_snr_sigma_edges_are_equally_spaced_in_log_sigma():
    process, N = EDMProcess(sigma_min=0.002, sigma_max=80.0), 10
    base = UniformSigma(0.002, 80.0, log_space=False)
    u, sigma = cluster_bounds(process, N, "log_snr", base=base)
    steps = torch.tensor(sigma[1:-1], dtype=torch.float64).log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(80 / 0.002) / N))
    torch.testing.assert_close(torch.tensor(u[1:-1], dtype=torch.float64),
                               base.cdf(torch.tensor(sigma[1:-1], dtype=torch.float64)))
    with pytest.raises(ValueError, match="clustering='log_snr'"):  # a density with no mass in some clusters
        cluster_bounds(process, N, "log_snr", base=LogNormalSigma(P_mean=0.0, P_std=0.01))


# ---------------------------------------------------------------------- stage supports
def test_float_rounding_of_boundaries_is_fixed():
    assert 1 - 0.8 == 0.19999999999999996  # the float that used to floor to t = 199
    dist = UniformTimesteps(1000)
    dist.restrict(1 - 0.8, 1.0)
    t, _ = dist.sample(20_000, generator=gen(0))
    assert t.min().item() == 200
    # the boundary itself maps to its timestep: u = 1 - n/N lands a hair below (T - nT/N)/T for many n, N
    pairs = [(n, N) for N in (4, 5, 8, 10, 20, 25, 40, 50) for n in range(1, N + 1)]
    u = torch.tensor([1 - n / N for n, N in pairs], dtype=torch.float64)
    assert dist.icdf(u).tolist() == [1000 - n * 1000 // N for n, N in pairs]


@pytest.mark.parametrize("T, N", [(1000, 5), (1000, 3), (1000, 20), (7, 3)])
def test_discrete_stage_support_is_the_cluster_union_drawn_uniformly(T, N):
    u_bounds, levels = cluster_bounds(VPProcess("linear", T), N)
    edges = [int(b) for b in levels]
    for stage in range(1, N + 1):
        dist = UniformTimesteps(T)
        dist.restrict(*stage_support(u_bounds, stage))
        n = 400 * (T - edges[N - stage])
        t, w = dist.sample(n, generator=gen(stage))
        counts = torch.bincount(t, minlength=T)
        support = [c for cluster in clusters_of(edges)[N - stage:] for c in cluster]
        assert torch.nonzero(counts).flatten().tolist() == support  # exactly the n easiest clusters
        observed = counts[support].double()
        chi2 = ((observed - n / len(support)) ** 2 / (n / len(support))).sum().item()
        if len(support) > 1:
            assert chi2 < stats.chi2.ppf(1 - 1e-4, len(support) - 1)
        torch.testing.assert_close(w, torch.ones(n))


@pytest.mark.parametrize("stage", [1, 5, 12])
def test_sigma_stage_draws_follow_the_truncated_lognormal(stage):
    N, base = 20, LogNormalSigma(-1.2, 1.2)
    u_bounds, sigma_edges = cluster_bounds(EDMProcess(), N, "quantile", base=base)
    u_low, u_high = stage_support(u_bounds, stage)
    assert (u_low, u_high) == (pytest.approx(1 - stage / N), 1.0)
    base.restrict(u_low, u_high)
    sigma, _ = base.sample(50_000, generator=gen(stage))
    assert sigma.min().item() >= sigma_edges[N - stage] * (1 - 1e-5)

    def truncated_cdf(x):  # analytic CDF of ln sigma ~ N(-1.2, 1.2^2) truncated to [u_low, 1]
        z = (x.log() + 1.2) / 1.2
        return ((0.5 * (1 + torch.erf(z / math.sqrt(2))) - u_low) / (u_high - u_low)).clamp(0, 1)

    assert ks_distance(sigma, truncated_cdf) < 1.63 / math.sqrt(len(sigma))  # KS at alpha = 1%
    assert ks_distance(sigma, LogNormalSigma(-1.2, 1.2).cdf) > 0.02  # and not the untruncated density


# ---------------------------------------------------------------------- pacers
def run(pacer, losses) -> list[int]:
    """The 1-based steps at which the pacer switched."""
    return [i for i, loss in enumerate(losses, 1) if pacer.step(loss)]


@pytest.mark.parametrize("smoothing", [0.0, 0.9])
def test_strictly_decreasing_loss_never_advances(smoothing):
    pacer = PatiencePacer(num_stages=5, patience=3, smoothing=smoothing)
    assert run(pacer, [1.0 / (1 + 0.01 * i) for i in range(500)]) == []
    assert pacer.stage == 1 and pacer.wait == 0


@pytest.mark.parametrize("patience", [1, 3, 10])
def test_constant_loss_advances_every_patience_plus_two_and_never_beyond_n(patience):
    pacer = PatiencePacer(num_stages=4, patience=patience, smoothing=0.9)
    switches = run(pacer, [0.5] * (10 * (patience + 2)))
    assert switches == [(patience + 2) * k for k in (1, 2, 3)]
    assert pacer.stage == 4 and pacer.finished


def test_each_switch_resets_best_wait_and_smoothing():
    # The loss jumps up in each new stage: with a stale best every stage would end one step sooner.
    pacer = PatiencePacer(num_stages=4, patience=2)
    losses, switches, step = [], [], 0
    while pacer.stage < 4 and step < 100:
        step += 1
        if pacer.step(float(pacer.stage)):
            switches.append(step)
    assert switches == [4, 8, 12]
    assert (pacer.best, pacer.wait, math.isnan(pacer.smoothed)) == (math.inf, 0, True)


def test_smoothing_and_delta_modes():
    pacer = PatiencePacer(num_stages=2, patience=5, smoothing=0.5)
    pacer.step(1.0)
    pacer.step(0.0)
    assert pacer.smoothed == 0.5 and pacer.best == 0.5
    # decreases of 1e-4 per step: below a relative delta of 1e-2 (advances), above an absolute 1e-5 (never)
    slow = [1.0 - 1e-4 * i for i in range(60)]
    assert run(PatiencePacer(2, patience=5, min_delta=1e-2), slow) == [7]
    assert run(PatiencePacer(2, patience=5, min_delta=1e-5, delta_mode="absolute"), slow) == []
    assert run(PatiencePacer(2, patience=5, min_delta=1e-3, delta_mode="absolute"), slow) == [7]


def test_hard_cap_and_fixed_pacing():
    decreasing = [1.0 / (1 + i) for i in range(100)]
    assert run(PatiencePacer(4, patience=50, max_steps_per_stage=7), decreasing) == [7, 14, 21]
    fixed = FixedPacer(num_stages=3, steps_per_stage=5)
    assert [i for i in range(1, 40) if fixed.step()] == [5, 10]
    assert fixed.stage == 3 and fixed.finished


def test_state_round_trip_reproduces_decisions():
    losses = [1.0 + 0.3 * ((i * 7919) % 13) / 13 - 0.001 * i for i in range(300)]
    make = functools.partial(PatiencePacer, num_stages=10, patience=4, smoothing=0.7, min_delta=1e-3,
                             max_steps_per_stage=40)
    straight = make()
    expected = run(straight, losses)
    assert len(expected) >= 3  # the stream makes real decisions
    for cut in (5, 37, 111):
        first = make()
        before = run(first, losses[:cut])
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)  # plain state: loads with weights_only=True
        buffer.seek(0)
        second = make()
        second.load_state_dict(torch.load(buffer, weights_only=True))
        after = [cut + s for s in run(second, losses[cut:])]
        assert before + after == expected and repr(second.state_dict()) == repr(straight.state_dict())  # nan-aware


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match=r"num_clusters=0 must be >= 1"):
        discrete_bounds(1000, 0)
    with pytest.raises(ValueError, match=r"num_clusters=2000 must be <= the process's 1000 timesteps"):
        cluster_bounds(VPProcess(num_timesteps=1000), 2000)
    with pytest.raises(ValueError, match=r"clustering='snr'"):
        cluster_bounds(VPProcess(), 20, "snr")
    with pytest.raises(ValueError, match=r"patience=0"):
        PatiencePacer(4, patience=0)
    with pytest.raises(ValueError, match=r"smoothing=1.0"):
        PatiencePacer(4, patience=3, smoothing=1.0)
    with pytest.raises(ValueError, match=r"delta_mode='rel'"):
        PatiencePacer(4, patience=3, delta_mode="rel")
    with pytest.raises(ValueError, match=r"steps_per_stage=0"):
        FixedPacer(4, steps_per_stage=0)
    with pytest.raises(ValueError, match=r"stage=5"):
        stage_support([0.0, 0.5, 1.0], 5)
