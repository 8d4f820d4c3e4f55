"""The Gaussian mixture's closed forms (docs/algorithms.md 7) against independent computations."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch.distributions import MultivariateNormal

from conftest import gen
from lightning_diffusion.core.noise import EDMProcess, RectifiedFlowProcess, VPProcess
from lightning_diffusion.core.targets import stf_target
from lightning_diffusion.data import GaussianMixture, GaussianMixtureDataModule
from lightning_diffusion.metrics.mixture import exact_fd, levels_for_sigmas, sigma_grid


def small_mixture(seed: int = 0) -> GaussianMixture:
    """2 classes x 2 components in 2x1x2 = 4 dimensions, random rotations and scales."""
    g = gen(seed)
    k, d = 4, 4
    eigvecs = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=torch.float64))[0]
    eigvals = 0.05 + torch.rand(k, d, generator=g, dtype=torch.float64)
    means = 2 * torch.randn(k, d, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.1, 0.3, 0.4, 0.2]), means, eigvecs, eigvals, torch.tensor([0, 0, 1, 1]),
                           (2, 1, 2))


def brute_force_posterior_mean(m: GaussianMixture, x: torch.Tensor, a: float, s: float, labels=None) -> torch.Tensor:
    """E[x0 | x_t] from full covariance matrices and torch's MultivariateNormal: no eigen-shortcuts."""
    x = x.double().reshape(x.shape[0], -1)
    sigmas = (m.eigvecs * m.eigvals[:, None, :]) @ m.eigvecs.transpose(1, 2)
    eye = torch.eye(m.dim, dtype=torch.float64)
    logs, conds = [], []
    for k in range(len(m.weights)):
        cov_t = a * a * sigmas[k] + s * s * eye
        logs.append(MultivariateNormal(a * m.means[k], cov_t).log_prob(x) + m.weights[k].log())
        gain = a * sigmas[k] @ torch.linalg.inv(cov_t)  # Sigma a (a^2 Sigma + s^2 I)^-1
        conds.append(m.means[k] + (x - a * m.means[k]) @ gain.T)
    log_r = torch.stack(logs, 1)
    if labels is not None:
        log_r = log_r.masked_fill(m.component_classes[None] != labels[:, None], -math.inf)
    r = torch.softmax(log_r, 1)
    return torch.einsum("nk,knd->nd", r, torch.stack(conds))


@pytest.mark.parametrize("a,s", [(0.9, 0.3), (1.0, 2.0), (0.2, 0.98), (0.7, 0.3)])
def test_posterior_mean_equals_the_full_covariance_formula(a, s):
    m = small_mixture()
    x0, labels = m.sample(300, gen(1))
    x_t = a * x0 + s * torch.randn(x0.shape, generator=gen(2))
    ours = m.posterior_mean(x_t, a, s).double().reshape(300, -1)
    torch.testing.assert_close(ours, brute_force_posterior_mean(m, x_t, a, s), rtol=1e-5, atol=1e-5)
    ours_c = m.posterior_mean(x_t, a, s, labels).double().reshape(300, -1)
    torch.testing.assert_close(ours_c, brute_force_posterior_mean(m, x_t, a, s, labels), rtol=1e-5, atol=1e-5)
    # per-sample coefficients give the same as scalars
    per_sample = m.posterior_mean(x_t, torch.full((300,), a), torch.full((300,), s), labels).double()
    torch.testing.assert_close(per_sample.reshape(300, -1), ours_c, rtol=1e-5, atol=1e-5)


def test_bayes_error_closed_form_matches_monte_carlo_and_beats_any_other_estimate():
    m = GaussianMixture.digits()
    x0, labels = m.sample(4000, gen(3))
    a, s = 0.6, 0.8
    x_t = a * x0 + s * torch.randn(x0.shape, generator=gen(4))
    d_star, bayes = m.posterior(x_t, a, s, labels)
    mc = (x0.double().reshape(4000, -1) - d_star).square().sum(1)
    assert bayes.mean().item() == pytest.approx(mc.mean().item(), rel=0.03)
    # D* is the best estimate: shrinking it toward the data mean, or dropping the labels, costs error
    shrunk = 0.9 * d_star + 0.1 * m.mean
    assert (x0.double().reshape(4000, -1) - shrunk).square().sum(1).mean() > mc.mean()
    unconditional, _ = m.posterior(x_t, a, s)
    assert (x0.double().reshape(4000, -1) - unconditional).square().sum(1).mean() > mc.mean()


def test_samples_follow_classes_and_exact_moments():
    m = GaussianMixture.digits()
    assert (m.num_classes, len(m.weights), m.shape) == (10, 30, (1, 8, 8))
    x, labels = m.sample(20000, gen(5))
    assert x.shape == (20000, 1, 8, 8) and x.dtype == torch.float32
    flat = x.double().reshape(20000, -1)
    assert (flat.mean(0) - m.mean).abs().max() < 0.04
    assert (torch.cov(flat.T) - m.covariance).abs().max() < 0.05
    wanted = torch.arange(200) % 10
    _, got = m.sample(200, gen(6), wanted)
    assert torch.equal(got, wanted)
    assert (m.classify(m.sample(500, gen(7), torch.arange(500) % 10)[0]) == torch.arange(500) % 10).float().mean() > 0.95


def test_log_prob_equals_torch_mixture_density():
    m = small_mixture()
    x, labels = m.sample(200, gen(8))
    flat = x.double().reshape(200, -1)
    sigmas = (m.eigvecs * m.eigvals[:, None, :]) @ m.eigvecs.transpose(1, 2)
    comps = torch.stack([MultivariateNormal(m.means[k], sigmas[k]).log_prob(flat) for k in range(4)], 1)
    expected = torch.logsumexp(comps + m.weights.log(), 1)
    torch.testing.assert_close(m.log_prob(x), expected, rtol=1e-6, atol=1e-6)
    own = comps + m.weights.log() - m.class_probs[m.component_classes].log()
    own = own.masked_fill(m.component_classes[None] != labels[:, None], -math.inf)
    torch.testing.assert_close(m.log_prob(x, labels), torch.logsumexp(own, 1), rtol=1e-6, atol=1e-6)


def test_save_load_round_trip_and_refusals(tmp_path):
    m = small_mixture()
    m.save(tmp_path / "m.npz")
    back = GaussianMixture.load(tmp_path / "m.npz")
    x, _ = m.sample(50, gen(9))
    torch.testing.assert_close(back.posterior_mean(x, 0.5, 0.5), m.posterior_mean(x, 0.5, 0.5), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temp file left beside it
    (tmp_path / "evil.npz").write_bytes(pickle.dumps({"weights": 1}))
    with pytest.raises(ValueError, match="not a mixture file"):
        GaussianMixture.load(tmp_path / "evil.npz")
    with pytest.raises(ValueError, match="not a mixture file"):
        GaussianMixture.load(tmp_path / "missing.npz")


def test_exact_fd_is_near_zero_for_true_samples_and_measures_a_shift():
    m = GaussianMixture.digits()
    x, _ = m.sample(20000, gen(10))
    assert exact_fd(x, m).item() < 0.15
    shift = 0.5
    assert exact_fd(x + shift, m).item() == pytest.approx(exact_fd(x, m).item() + 64 * shift**2, abs=0.05)


def test_every_process_is_scored_at_the_same_noise_levels():
    sigmas = sigma_grid(8, 0.05, 20.0)
    assert sigmas[0].item() == pytest.approx(0.05) and sigmas[-1].item() == pytest.approx(20.0)
    edm = EDMProcess()
    torch.testing.assert_close(levels_for_sigmas(edm, sigmas).double(), sigmas, rtol=1e-6, atol=0)
    flow = RectifiedFlowProcess()
    a, s = flow.alpha_sigma(levels_for_sigmas(flow, sigmas))
    torch.testing.assert_close((s / a).double(), sigmas, rtol=1e-4, atol=0)
    vp = VPProcess("cosine", 1000)
    a, s = vp.alpha_sigma(levels_for_sigmas(vp, sigmas))
    assert ((s / a).double().log() - sigmas.log()).abs().max() < 0.05  # nearest of 1000 timesteps


@pytest.mark.parametrize("sigma", [1.0, 3.6])
def test_stf_targets_with_many_references_approach_the_optimal_denoiser(sigma):
    """STF (docs/algorithms.md 2) averages references by their posterior weight: with references drawn
    from the data it converges to D*, and its error around D* falls far below the plain target's.
    (At low noise, sigma < 0.5 here, the own reference dominates and nothing changes:
    benchmarks/stf_variance.py measures the reduction per level.)"""
    m = GaussianMixture.digits()
    x0, labels = m.sample(256, gen(11))
    x_t = x0 + sigma * torch.randn(x0.shape, generator=gen(12))
    d_star = m.posterior_mean(x_t, 1.0, sigma, labels).double()
    plain = (x0.double() - d_star).square().mean().item()  # the standard target's error = the Bayes error
    errors = []
    for n in (64, 1024, 8192):
        refs, ref_labels = m.sample(n, gen(13))
        target = stf_target(x_t, sigma, torch.cat([x0, refs]), labels=labels,
                            ref_labels=torch.cat([labels, ref_labels]))
        errors.append((target.double() - d_star).square().mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.35 * plain, (errors, plain)


def test_datamodule_serves_mixture_samples_with_classes():
    dm = GaussianMixtureDataModule(batch_size=32, train_size=256, val_size=64, seed=3)
    assert (dm.channels, dm.image_size, dm.num_classes) == (1, 8, 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert x.abs().max() > 1.0  # the mixture's samples, not clamped to the image range
    again = GaussianMixtureDataModule(batch_size=32, train_size=256, val_size=64, seed=3)
    assert torch.equal(dm.train_dataset.images, again.train_dataset.images)
    with pytest.raises(ValueError, match="train_size"):
        GaussianMixtureDataModule(train_size=0)
