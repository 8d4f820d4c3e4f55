"""Power-function EMA math, snapshots and post-hoc reconstruction (docs/algorithms.md 3.4-3.5)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from lightning_diffusion.ema import (PowerFunctionEMA, gamma_to_sigma_rel, list_snapshots, load_snapshot,
                                     power_function_beta, reconstruct, save_snapshot, sigma_rel_to_gamma,
                                     snapshot_name, solve_posthoc_coefficients)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94), (0.015, 63.66)])
def test_reference_gammas_and_round_trip(sigma_rel, gamma):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g == pytest.approx(gamma, abs=0.005)
    assert gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("bad", [0.2887, 0.3, 0.0, -0.05])
def test_bad_sigma_rel_names_the_setting(bad):
    with pytest.raises(ValueError, match=rf"sigma_rel={bad}.*0 < sigma_rel < 12\^-0.5"):
        sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match=rf"sigma_rels={bad}"):
        PowerFunctionEMA(nn.Linear(2, 2), sigma_rels=(0.05, bad))


def test_beta_formula_and_first_update():
    g = sigma_rel_to_gamma(0.1)
    assert power_function_beta(0.1, t=1000, dt=10) == pytest.approx((1 - 10 / 1000) ** (g + 1))
    assert power_function_beta(0.1, t=10, dt=10) == 0.0
    with pytest.raises(ValueError, match="0 < dt <= t"):
        power_function_beta(0.1, t=10, dt=20)


def test_stored_profile_is_returned():
    times = [100, 200, 300, 100, 200, 300]
    sigmas = [0.05, 0.05, 0.05, 0.10, 0.10, 0.10]
    X = solve_posthoc_coefficients(times, sigmas, 300, [0.10, 0.05])
    assert X.dtype == torch.float64 and X.shape == (6, 2)
    torch.testing.assert_close(X.sum(0), torch.ones(2, dtype=torch.float64))
    expected = torch.zeros(6, 2, dtype=torch.float64)
    expected[5, 0] = expected[2, 1] = 1.0
    torch.testing.assert_close(X, expected, atol=1e-8, rtol=0)


def _ramp_ema(k: int, n: int = 2000) -> list[float]:
    """EMA of theta(nimg) = nimg, updated every k images with the full gap."""
    module = nn.Module()
    module.p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ema, last = PowerFunctionEMA(module, (0.05, 0.10)), 0
    for s in range(1, n + 1):
        module.p.data.fill_(s)
        if s % k == 0:
            ema.update(s, s - last)
            last = s
    return [a[0].item() / n for a in ema.averages]


def test_update_every_k_keeps_the_profile():
    # Continuous profile mean of theta = t is (g+1)/(g+2) t; updating every k images only adds
    # the sampling lag of about (k-1)/2 images (a wrong dt=1 gives 0.82 and 0.67 here).
    exact = [(g + 1) / (g + 2) for g in map(sigma_rel_to_gamma, (0.05, 0.10))]
    every = _ramp_ema(1)
    for k in (4, 10):
        for e, x, ref in zip(_ramp_ema(k), every, exact):
            assert abs(e - x) <= 1.05 * (k - 1) / 2 / 2000
            assert abs(e - ref) < k / 2000


def _walk(every: int, steps: int = 2000, n: int = 256):
    """Random-walk weights tracked at 0.05/0.10 (snapshots every `every` steps) and at 0.15 directly."""
    torch.manual_seed(0)
    net = nn.Linear(n, 1, bias=False).double()
    ema, direct = PowerFunctionEMA(net, (0.05, 0.10)), PowerFunctionEMA(net, (0.15,))
    snaps = []
    for s in range(1, steps + 1):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ema.update(s, 1)
        direct.update(s, 1)
        if s % every == 0:
            snaps += [(ema.profile_state_dict(i), sr, ema.gammas[i], s) for i, sr in enumerate(ema.sigma_rels)]
    return snaps, direct.averages[0][0]


# Measured relative error (|| . ||_2 / ||direct||): every 100 steps (20 snapshot times) 1.4e-4,
# every 50 steps 1.4e-5, every 20 steps 7e-7; it is set by the number of snapshot times.
@pytest.mark.parametrize("every, tol", [(100, 3e-4), (50, 3e-5)])
def test_reconstruct_matches_direct_tracking(tmp_path, every, tol):
    snaps, direct = _walk(every)
    paths = [save_snapshot(tmp_path / f"{s}-{sr}.pt", sd, sr, g, s) for sd, sr, g, s in snaps]
    out = reconstruct(paths, [0.15], dtype=torch.float64)[0]["weight"]
    assert ((out - direct).norm() / direct.norm()).item() < tol


def test_reconstruct_at_earlier_time_and_stored_profile(tmp_path):
    snaps, _ = _walk(100, steps=400)
    paths = [save_snapshot(tmp_path / snapshot_name(s, sr), sd, sr, g, s) for sd, sr, g, s in snaps]
    a, b = reconstruct(paths, [0.10, 0.05], out_nimg=300)
    torch.testing.assert_close(a["weight"], snaps[5][0]["weight"].float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b["weight"], snaps[4][0]["weight"].float(), rtol=1e-5, atol=1e-4)
    assert [h["nimg"] for h in list_snapshots(tmp_path)] == [100, 100, 200, 200, 300, 300, 400, 400]


def test_snapshot_format_fp16_and_atomic(tmp_path):
    state = {"w": torch.randn(3, 3), "n": torch.tensor(7)}
    path = save_snapshot(tmp_path / "s.pt", state, 0.1, sigma_rel_to_gamma(0.1), 640, dtype="float16")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"sigma_rel", "gamma", "nimg", "state_dict", "dtype"}
    assert raw["dtype"] == "float16" and raw["state_dict"]["w"].dtype == torch.float16
    assert raw["state_dict"]["n"].dtype == torch.int64 and raw["nimg"] == 640
    assert os.listdir(tmp_path) == ["s.pt"]  # no temp file left behind
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        save_snapshot(tmp_path / "t.pt", state, 0.1, 1.0, 1, dtype="bfloat16")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_crafted_snapshot_is_refused(tmp_path):
    path = tmp_path / "phema-000000000100-0.1000.pt"
    torch.save({"sigma_rel": 0.1, "gamma": 6.9, "nimg": 100, "state_dict": {"w": _Evil()}, "dtype": "float32"},
               path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_snapshot(path)
    with pytest.raises(ValueError, match="not a loadable EMA snapshot"):
        reconstruct([path], [0.1])
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="needs the keys"):
        load_snapshot(tmp_path / "other.pt")


def test_ema_state_swap_and_buffers(tmp_path):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = PowerFunctionEMA(net, (0.05, 0.10))
    with pytest.raises(RuntimeError, match="no update"):
        ema.swap_in(0)
    for s in range(1, 6):
        net(torch.randn(8, 3))  # moves the running stats
        with torch.no_grad():
            net[0].weight.add_(1.0)
        ema.update(4 * s, 4)
    with pytest.raises(ValueError, match="does not continue"):
        ema.update(100, 4)
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped_in(1) as module:
        for k, v in ema.profile_state_dict(1).items():
            assert torch.equal(module.state_dict()[k], v)
    for k, v in net.state_dict().items():
        assert torch.equal(v, raw[k])
    assert torch.equal(ema.profile_state_dict(0)["1.running_mean"], raw["1.running_mean"])  # copied
    torch.save(ema.state_dict(), tmp_path / "e.pt")
    other = PowerFunctionEMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), (0.05, 0.10))
    other.load_state_dict(torch.load(tmp_path / "e.pt", weights_only=True))
    assert other.nimg == 20 and other.num_updates == 5
    for a, b in zip(other.profile_state_dict(0).values(), ema.profile_state_dict(0).values()):
        assert torch.equal(a, b)


def test_half_precision_params_average_in_fp32():
    net = nn.Linear(4, 4).to(torch.bfloat16)
    ema = PowerFunctionEMA(net, (0.1,), offload_to_cpu=True)
    ema.update(1, 1)
    assert ema.averages[0][0].dtype == torch.float32
    assert math.isclose(ema.averages[0][0][0, 0].item(), net.weight[0, 0].float().item())
