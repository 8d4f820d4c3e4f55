"""Adaptive timestep sampling (docs/algorithms.md 4): Beta draws, the policy, REINFORCE, the look-ahead
buffer and subset S, the callback around the optimizer step, resume and DDP."""

from __future__ import annotations

import copy
import functools
import math
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from conftest import gen, quiet_trainer
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import AdaptiveTimestepSampling, LossAwareTimestepSampling
from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.vlb import vlb_weights
from lightning_diffusion.core.weighting import MinSNRWeighting
from lightning_diffusion.networks import UNet
from lightning_diffusion.timesteps import AdaptiveTimesteps, LogNormalSigma, UniformTimesteps
from lightning_diffusion.timesteps.beta import beta_sample, log_gamma_sample
from lightning_diffusion.timesteps.lookahead import LookaheadBatch, LookaheadBuffer, VLBTerm

ADAM = functools.partial(torch.optim.Adam, lr=2e-3)
BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")



def images(n: int = 64, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=gen(seed)) * 2 - 1


# ---------------------------------------------------------------------- Beta draws
@pytest.mark.parametrize("a, b", [(0.974, 0.974), (0.3, 0.5), (2.0, 5.0), (10.0, 1.0), (0.05, 0.05)])
def test_beta_sampler_matches_beta_moments(a, b):
    n = 100_000
    u = beta_sample(torch.full((n,), a), torch.full((n,), b), gen(1))
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert torch.isfinite(u).all() and ((u >= 0) & (u <= 1)).all()
    assert u.double().mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / n))
    assert u.double().var().item() == pytest.approx(var, rel=0.03)
    if min(a, b) < 0.1:
        return  # float32 rounds much of Beta(0.05, 0.05)'s mass to exactly 0 or 1: no KS
    # the whole distribution, not only two moments: KS at alpha = 1e-3
    assert stats.kstest(u.double().numpy(), stats.beta(a, b).cdf).pvalue > 1e-3


@pytest.mark.parametrize("shape", [0.2, 1.0, 7.5])
def test_gamma_sampler_moments_and_fixed_stream(shape):
    g = log_gamma_sample(torch.full((100_000,), shape), gen(2)).double().exp()
    assert g.mean().item() == pytest.approx(shape, rel=0.02) and g.var().item() == pytest.approx(shape, rel=0.04)
    again = log_gamma_sample(torch.full((100_000,), shape), gen(2)).double().exp()
    assert torch.equal(g, again)  # reproducible from the generator alone (exact resume, per-rank streams)


# ---------------------------------------------------------------------- the policy
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32), (4, 5)])
def test_policy_is_near_uniform_at_init_for_any_image_shape(channels, size):
    dist = AdaptiveTimesteps(UniformTimesteps(1000))
    x0 = images(64, channels, size)
    alpha, beta = dist.beta_params(x0)
    expected = F.softplus(torch.tensor(0.5)).item() + 1e-5  # W = 0, b = 0.5 at init
    torch.testing.assert_close(alpha, torch.full((64,), expected))
    torch.testing.assert_close(beta, torch.full((64,), expected))
    many = images(20_000, channels, 4)  # any resolution: the draw itself on small images, for speed
    t = dist.sample(20_000, generator=gen(1), x0=many)[0]
    freq = torch.bincount(t // 100, minlength=10).double() / len(t)
    # Beta(0.974, 0.974) puts 0.0984 .. 0.1036 in each tenth: within 0.004 of uniform; sd here ~0.0021
    assert (freq - 0.1).abs().max().item() < 0.012
    _, w = dist.sample(64, generator=gen(0), x0=x0)
    assert torch.equal(w, torch.ones(64))  # the diffusion loss is not reweighted


def test_reinforce_moves_probability_toward_reward_and_back_when_the_sign_flips():
    dist = AdaptiveTimesteps(UniformTimesteps(1000), lr=2e-2)
    x0 = images(64)

    def mean_u():
        with torch.no_grad():
            alpha, beta = dist.beta_params(x0)
        return (alpha / (alpha + beta)).mean().item()

    start = mean_u()
    for step in range(60):  # reward the high-noise end: R = u - 0.5
        dist.sample(64, generator=gen(step), x0=x0)
        dist.policy_step(dist.last_x0, dist.last_u, dist.last_u - 0.5, ent_coef=1e-2)
    up = mean_u()
    for step in range(120):  # the sign flips: the low-noise end pays
        dist.sample(64, generator=gen(100 + step), x0=x0)
        dist.policy_step(dist.last_x0, dist.last_u, 0.5 - dist.last_u, ent_coef=1e-2)
    down = mean_u()
    assert start == pytest.approx(0.5, abs=1e-6)
    assert up > 0.6 and down < 0.4, (start, up, down)


def test_restrict_maps_the_draw_into_the_range():
    x0 = images(64)
    vp = AdaptiveTimesteps(UniformTimesteps(1000))
    vp.restrict(0.75, 1.0)
    t = vp.sample(64, generator=gen(0), x0=x0)[0]
    assert t.min().item() >= 750 and t.max().item() <= 999
    edm = AdaptiveTimesteps(LogNormalSigma(-1.2, 1.2))
    edm.restrict(0.0, 0.5)
    sigma = edm.sample(64, generator=gen(0), x0=x0)[0]
    assert sigma.dtype == torch.float32 and sigma.max().item() <= math.exp(-1.2) * (1 + 1e-5)
    with pytest.raises(ValueError, match="u_low < u_high"):
        vp.restrict(0.5, 0.5)


def test_state_round_trip_reproduces_the_next_draw_and_step():
    dist = AdaptiveTimesteps(UniformTimesteps(1000))
    x0 = images(32)
    for step in range(3):
        dist.sample(32, generator=gen(step), x0=x0)
        dist.policy_step(dist.last_x0, dist.last_u, dist.last_u - 0.5)
    dist.restrict(0.2, 0.9)
    state = copy.deepcopy(dist.state_dict())
    fresh = AdaptiveTimesteps(UniformTimesteps(1000))
    fresh.load_state_dict(state)  # applied when the policy is built (lazily, at the first draw)
    a, b = dist.sample(32, generator=gen(9), x0=x0)[0], fresh.sample(32, generator=gen(9), x0=x0)[0]
    assert torch.equal(a, b) and fresh.u_low == 0.2
    reward = torch.linspace(-1, 1, 32)
    dist.policy_step(x0, dist.last_u, reward)
    fresh.policy_step(x0, fresh.last_u, reward)  # Adam's moments came back too
    for p, q in zip(dist.policy.parameters(), fresh.policy.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------- look-ahead
class _FakeModule:
    """lookahead_loss with a known answer: loss = level * mean(x0) + mean(noise) + 100 * label."""

    def lookahead_loss(self, x0, noise, level, labels):
        return level.float() * x0.flatten(1).mean(1) + noise.flatten(1).mean(1) + 100 * labels.float()


def test_lookahead_batch_layout_and_common_noise():
    x0, subset, grid = images(5), torch.tensor([10, 20]), torch.tensor([1, 2, 3, 4])
    labels = torch.tensor([0, 1, 2, 3, 4])
    batch = LookaheadBatch(x0, labels, subset, grid, probe_images=2, generator=gen(0))
    per_sample, probe = batch.losses(_FakeModule(), chunk=3)
    noise = batch.noise.flatten(1).mean(1)
    expect = subset[:, None] * x0.flatten(1).mean(1)[None] + noise[:10].view(2, 5) + 100 * labels[None]
    torch.testing.assert_close(per_sample, expect.float())
    probe_expect = (grid[:, None] * x0[:2].flatten(1).mean(1)[None] + noise[10:].view(4, 2)
                    + 100 * labels[None, :2]).mean(1)
    torch.testing.assert_close(probe, probe_expect.float())
    again, _ = batch.losses(_FakeModule(), chunk=100)
    assert torch.equal(again, per_sample)  # the same noise after the step: common random numbers
    batch.noise = batch.draw_noise()
    assert not torch.equal(batch.losses(_FakeModule(), chunk=100)[0], per_sample)


def _planted(rows: int, columns: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """dL rows where `columns` move together with a common factor and the rest is small noise."""
    g = gen(seed)
    out = []
    for _ in range(rows):
        dL = 0.05 * torch.randn(12, generator=g)
        dL[list(columns)] += torch.randn(1, generator=g)
        out.append(dL)
    return out


def test_feature_selection_recovers_planted_levels_from_the_last_entries():
    buffer = LookaheadBuffer(num_levels=12, size=20)
    assert buffer.select(3) is None
    for dL in _planted(20, (2, 7, 11), seed=0):
        buffer.push(dL)
    assert buffer.select(3).tolist() == [2, 7, 11]
    for dL in _planted(20, (0, 4, 5), seed=1):  # a full ring later only the new regime counts
        buffer.push(dL)
    assert buffer.count == 40 and buffer.filled == 20
    assert buffer.select(3).tolist() == [0, 4, 5]
    last = _planted(20, (0, 4, 5), seed=1)
    torch.testing.assert_close(buffer.dL, torch.stack(last))  # the ring holds exactly the last 20
    torch.testing.assert_close(buffer.y, torch.stack(last).sum(1))


# ---------------------------------------------------------------------- the variational-bound reward
def _linear_abar(T: int = 1000) -> tuple[list[float], list[float]]:
    """The linear schedule by hand, in Python floats: (betas, abar)."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        abar.append(prod)
    return betas, abar


def test_vlb_weight_matches_a_hand_computation_on_the_linear_schedule():
    betas, abar = _linear_abar()
    w = vlb_weights(VPProcess("linear", 1000))
    assert w.dtype == torch.float64 and w.shape == (1000,)
    for t in (1, 2, 10, 500, 999):
        c0 = math.sqrt(abar[t - 1]) * betas[t] / (1 - abar[t])  # x0's coefficient in the posterior mean
        var = (1 - abar[t - 1]) * betas[t] / (1 - abar[t])  # posterior variance beta~_t
        hand = c0**2 / (2 * var) / math.log(2)
        snr = [a / (1 - a) for a in (abar[t - 1], abar[t])]
        assert w[t].item() == pytest.approx(hand, rel=1e-9)
        assert w[t].item() == pytest.approx((snr[0] - snr[1]) / (2 * math.log(2)), rel=1e-7)
    assert w[1].item() == pytest.approx(3933.25, rel=1e-5)  # pinned: SNR 9999 -> 4546.6
    var1 = (1 - abar[0]) * betas[1] / (1 - abar[1])
    assert w[0].item() == pytest.approx(1 / (2 * math.log(2) * var1), rel=1e-9)  # stand-in: beta~_0 := beta~_1
    assert bool((w[1:] > 0).all()) and bool((w[1:-1] > w[2:]).all())  # decreasing in t on this schedule


class _Predicts:
    """denoise through a network whose output is the prediction-space image of a given x0_hat."""

    def __init__(self, process, prediction, x0_hat):
        self.param, self.process, self.x0_hat = Parametrization(process, prediction), process, x0_hat

    def denoise(self, x_t, level, labels):
        a, s = (v.double().view(-1, 1, 1, 1) for v in self.process.alpha_sigma(level))
        eps_hat = (x_t.double() - a * self.x0_hat) / s
        out = {"x0": self.x0_hat, "eps": eps_hat, "v": a * eps_hat - s * self.x0_hat}[self.param.prediction]
        return self.param.to_x0(out.float(), x_t.float(), level)  # as DiffusionLightningModule.denoise


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_vlb_term_equals_the_kl_between_explicit_gaussians(prediction):
    process = VPProcess("linear", 1000)
    betas, abar = process.betas, process.alphas_cumprod
    x0, noise = images(6, 2, 4, seed=1).double(), torch.randn(6, 2, 4, 4, generator=gen(2), dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=gen(3), dtype=torch.float64)
    t = torch.tensor([1, 2, 30, 300, 700, 999])
    x_t = process.add_noise(x0.float(), noise.float(), t).double()
    got = VLBTerm(process)(_Predicts(process, prediction, x0_hat), x0.float(), noise.float(), t, None)
    for i, ti in enumerate(t.tolist()):
        c0 = abar[ti - 1].sqrt() * betas[ti] / (1 - abar[ti])
        ct = (1 - betas[ti]).sqrt() * (1 - abar[ti - 1]) / (1 - abar[ti])
        std = ((1 - abar[ti - 1]) * betas[ti] / (1 - abar[ti])).sqrt()
        true = torch.distributions.Normal(c0 * x0[i] + ct * x_t[i], std)
        model = torch.distributions.Normal(c0 * x0_hat[i] + ct * x_t[i], std)
        kl_bits_per_dim = torch.distributions.kl_divergence(true, model).mean() / math.log(2)
        assert got[i].item() == pytest.approx(kl_bits_per_dim.item(), rel=2e-3), ti


# ---------------------------------------------------------------------- the callback
def _module(dropout: float = 0.0, **kwargs) -> DiffusionLightningModule:
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), dropout=dropout)  # conftest's tiny_unet, with dropout
    return DiffusionLightningModule(net, optimizer=kwargs.pop("optimizer", ADAM), **kwargs)


def _loader(n: int = 16, batch_size: int = BATCH) -> DataLoader:
    # Every image is the same: a straight and a resumed run see identical batches.
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    return DataLoader(TensorDataset(image.expand(n, 1, 8, 8).clone()), batch_size=batch_size)


def _policy(cb: AdaptiveTimestepSampling) -> list[torch.Tensor]:
    return [p.detach().clone() for p in cb.sampler.policy.parameters()]


def test_updates_once_per_real_step_with_accumulation_and_prints_subset(capsys):
    cb = AdaptiveTimestepSampling(update_every=2, probe_grid=6, buffer_size=4)
    module = _module()
    quiet_trainer(max_steps=6, accumulate_grad_batches=2, limit_val_batches=0,
                  callbacks=[cb]).fit(module, _loader(32))
    assert module.timesteps is cb.sampler and cb.updates == 3 and cb.buffer.count == 3  # steps 0, 2, 4
    assert cb.sampler.optimizer.state_dict()["state"][0]["step"].item() == 3
    assert len(cb.subset) == 3 and all(0 <= i < 6 for i in cb.subset)
    assert "subset S at step" in capsys.readouterr().out
    assert module.net.training  # eval mode was restored


@pytest.mark.parametrize("fresh_noise", [False, True])
def test_before_and_after_bracket_the_step_in_eval_mode(fresh_noise):
    # The network does not move (lr = 0) but has dropout: with the same noise and eval mode the
    # look-ahead must see exactly no change; fresh noise (the official code's way) sees noise.
    cb = AdaptiveTimestepSampling(update_every=1, probe_grid=5, buffer_size=3, fresh_noise=fresh_noise,
                                  show_subset=False)
    module = _module(dropout=0.5, optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[cb]).fit(module, _loader())
    assert cb.buffer.count == 3
    assert (cb.buffer.dL.abs().max().item() == 0.0) != fresh_noise


def test_a_learning_network_gives_a_positive_decrease():
    cb = AdaptiveTimestepSampling(update_every=1, probe_grid=8, probe_images=4, buffer_size=10, show_subset=False)
    module = _module(optimizer=functools.partial(torch.optim.Adam, lr=5e-3))
    quiet_trainer(max_steps=10, limit_val_batches=0, callbacks=[cb]).fit(module, _loader(32))
    # The network fits one repeated image: summed over the grid, its loss goes down step after step.
    assert (cb.buffer.y > 0).float().mean().item() >= 0.8


def _fit(tmp_path, name, max_steps, ckpt_path=None, every_n_train_steps=None, reward="loss"):
    cb = AdaptiveTimestepSampling(update_every=2, probe_grid=6, buffer_size=3, show_subset=False, reward=reward)
    callbacks = [cb]
    if every_n_train_steps:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=every_n_train_steps,
                                         save_top_k=-1, filename="{step}"))
    quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=callbacks,
                  enable_checkpointing=bool(every_n_train_steps)).fit(_module(), _loader(), ckpt_path=ckpt_path)
    return cb


def test_resume_continues_exactly(tmp_path):
    straight = _fit(tmp_path, "a", 8)
    _fit(tmp_path, "b", 4, every_n_train_steps=3)
    ckpt = tmp_path / "b" / "step=3.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # plain state only
    assert raw["callbacks"]["AdaptiveTimestepSampling"]["updates"] == 2
    assert raw["diffusion"]["timesteps"]["policy"]["optimizer"]["state"][0]["step"].item() == 2
    resumed = _fit(tmp_path, "b", 8, ckpt_path=ckpt)
    assert resumed.updates == straight.updates == 4 and resumed.subset == straight.subset
    assert torch.equal(resumed.buffer.dL, straight.buffer.dL)
    assert all(torch.equal(p, q) for p, q in zip(_policy(resumed), _policy(straight)))


@pytest.mark.parametrize("edm", [False, True])
def test_works_with_min_snr_weighting_and_edm(edm):
    process = EDMProcess() if edm else None
    cb = AdaptiveTimestepSampling(update_every=2, probe_grid=6, buffer_size=3, show_subset=False)
    module = _module(process=process, prediction="x0" if edm else "v", weighting=MinSNRWeighting(5.0))

    class _Levels(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.level = outputs["level"]
            assert torch.isfinite(outputs["loss"])

    levels = _Levels()
    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[cb, levels]).fit(module, _loader())
    start = AdaptiveTimesteps(cb.sampler.base).build(1, "cpu")
    assert cb.updates == 2
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), cb.sampler.policy.parameters()))
    if edm:
        assert levels.level.dtype == torch.float32 and (levels.level > 0).all()
        expected = LogNormalSigma().icdf((torch.arange(6, dtype=torch.float64) + 0.5) / 6)
        torch.testing.assert_close(cb.grid_levels, expected)  # the probe grid: base quantiles
    else:
        assert levels.level.dtype == torch.int64
        assert cb.grid_levels.tolist() == [83, 250, 416, 583, 750, 916]


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="subset_size=7 must be <= the 6 probe_grid"):
        AdaptiveTimestepSampling(subset_size=7, probe_grid=6)
    with pytest.raises(ValueError, match=r"probe_grid=\[0.5, 1.0\]"):
        AdaptiveTimestepSampling(probe_grid=[0.5, 1.0])
    with pytest.raises(ValueError, match="update_every=0"):
        AdaptiveTimestepSampling(update_every=0)
    with pytest.raises(ValueError, match="buffer_size=1"):
        AdaptiveTimestepSampling(buffer_size=1)
    with pytest.raises(ValueError, match="both choose the training levels"):
        quiet_trainer(max_steps=1, callbacks=[LossAwareTimestepSampling(), AdaptiveTimestepSampling()]).fit(
            _module(), _loader())


class _Capture(pl.Callback):
    """Listed after the sampler's callback: the network before and after each step, its look-ahead
    batch, and the reward handed to the policy."""

    def __init__(self, cb: AdaptiveTimestepSampling):
        self.cb, self.seen = cb, []

    def on_train_start(self, trainer, pl_module):
        step = self.cb.sampler.policy_step
        self.cb.sampler.policy_step = lambda x0, u, reward, *a, **k: (self.seen.append(reward), step(
            x0, u, reward, *a, **k))[1]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.cb._pending is not None:
            self.before, self.batch = copy.deepcopy(pl_module.net.state_dict()), self.cb._pending[1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if hasattr(self, "batch"):
            self.after = copy.deepcopy(pl_module.net.state_dict())


def _subset_term(module, batch, reward):
    """The look-ahead's subset rows recomputed by hand: the weighted MSE, or w_t * mean (x0_hat - x0)^2."""
    n = batch.subset * batch.batch
    x0, noise, level = batch.x0[:n], batch.noise[:n], batch.level[:n]
    module.net.eval()
    with torch.no_grad():
        output, x_t, mse, weight = module.weighted_mse(x0, noise, level, None)
        x0_hat = module.param.to_x0(output, x_t, level)
    w = vlb_weights(module.process)[level].float()
    value = weight * mse if reward == "loss" else w * (x0_hat - x0).square().flatten(1).mean(1)
    return value.view(batch.subset, batch.batch)


@pytest.mark.parametrize("reward", ["loss", "vlb"])
def test_the_reward_option_sets_what_the_policy_is_rewarded_with(reward):
    cb = AdaptiveTimestepSampling(update_every=1, probe_grid=6, buffer_size=3, show_subset=False, reward=reward)
    capture = _Capture(cb)
    module = _module(prediction="v", optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[cb, capture]).fit(module, _loader())
    assert isinstance(cb.term, VLBTerm) == (reward == "vlb") and len(capture.seen) == 2
    terms = {}
    for name in ("loss", "vlb"):
        module.net.load_state_dict(capture.before)
        before = _subset_term(module, capture.batch, name)
        module.net.load_state_dict(capture.after)
        terms[name] = (before - _subset_term(module, capture.batch, name)).sum(0)
    torch.testing.assert_close(capture.seen[-1], terms[reward], rtol=1e-4, atol=1e-7)
    other = terms["vlb" if reward == "loss" else "loss"]
    assert not torch.allclose(capture.seen[-1], other, rtol=1e-2)  # the two rewards are told apart


def test_resume_keeps_the_vlb_reward(tmp_path):
    straight = _fit(tmp_path, "a", 8, reward="vlb")
    _fit(tmp_path, "b", 4, every_n_train_steps=3, reward="vlb")
    ckpt = tmp_path / "b" / "step=3.ckpt"
    assert torch.load(ckpt, weights_only=True)["callbacks"]["AdaptiveTimestepSampling"]["reward"] == "vlb"
    resumed = _fit(tmp_path, "b", 8, ckpt_path=ckpt, reward="vlb")
    assert isinstance(resumed.term, VLBTerm) and resumed.updates == straight.updates == 4
    assert torch.equal(resumed.buffer.dL, straight.buffer.dL)
    assert all(torch.equal(p, q) for p, q in zip(_policy(resumed), _policy(straight)))
    with pytest.raises(ValueError, match="holds reward='vlb' decreases; resume with reward='vlb'"):
        _fit(tmp_path, "b", 8, ckpt_path=ckpt, reward="loss")


def test_a_bad_reward_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"reward='kl' is not supported; use 'loss' or 'vlb'\.$"):
        AdaptiveTimestepSampling(reward="kl")
    cb = AdaptiveTimestepSampling(reward="vlb", show_subset=False)
    with pytest.raises(ValueError, match=r"reward='vlb' needs a VPProcess .*; with EDMProcess use reward='loss'\.$"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(_module(process=EDMProcess(), prediction="x0"), _loader())


# ---------------------------------------------------------------------- DDP
class _Dump(pl.Callback):
    """Each rank saves its S, buffer, policy and last drawn t (ddp_spawn: the parent sees none of it)."""

    def __init__(self, cb: AdaptiveTimestepSampling, directory: str):
        self.cb, self.directory = cb, directory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.level = outputs["level"]

    def on_train_end(self, trainer, pl_module):
        state = {"subset": self.cb.subset, "dL": self.cb.buffer.dL, "updates": self.cb.updates, "level": self.level,
                 "policy": _policy(self.cb)}
        torch.save(state, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


@pytest.mark.timeout(120)
def test_ddp_ranks_share_subset_and_policy_but_draw_their_own_t(tmp_path):
    cb = AdaptiveTimestepSampling(update_every=2, probe_grid=6, buffer_size=4, show_subset=False)
    trainer = quiet_trainer(max_steps=6, limit_val_batches=0, devices=2, strategy="ddp_spawn",
                            callbacks=[cb, _Dump(cb, str(tmp_path))])
    trainer.fit(_module(), _loader(48))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["updates"] == r1["updates"] == 3
    assert r0["subset"] == r1["subset"] and torch.equal(r0["dL"], r1["dL"])
    assert all(torch.equal(p, q) for p, q in zip(r0["policy"], r1["policy"]))
    start = AdaptiveTimesteps(UniformTimesteps(1000)).build(1, "cpu")
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), r0["policy"]))  # it did learn
    assert not torch.equal(r0["level"], r1["level"])  # same images on both ranks, different t


# ---------------------------------------------------------------------- the shipped recipe
def test_config_trains_logs_the_distribution_and_validates_from_its_checkpoint(tmp_path, monkeypatch):
    import csv
    from pathlib import Path

    from lightning_diffusion.cli import DiffusionCLI

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "adaptive.yaml"),
            "--model.init_args.net.init_args.model_channels=16",
            "--model.init_args.net.init_args.attention_resolutions=[]",
            "--model.init_args.fd_samples=0", "--data.init_args.batch_size=16", "--trainer.max_steps=6",
            "--trainer.val_check_interval=6", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=3",
            "--trainer.enable_progress_bar=false", "--trainer.callbacks.init_args.update_every=2",
            "--trainer.callbacks.init_args.probe_grid=6", f"--trainer.default_root_dir={tmp_path}"]
    cli = DiffusionCLI(args=["fit", *args])
    log_dir = Path(cli.trainer.log_dir)
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("adaptive/t_q50")]
    assert [int(r["step"]) for r in rows] == [2, 5]  # Lightning's step column: global_step - 1
    assert all(0 <= float(r["adaptive/t_q10"]) <= float(r["adaptive/t_q90"]) <= 999 for r in rows)
    assert all(r["adaptive/beta_mean"] and r["adaptive/reward"] for r in rows)
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["callbacks"]["AdaptiveTimestepSampling"]["updates"] == 3
    val = DiffusionCLI(args=["validate", *args, f"--ckpt_path={ckpt}"])
    restored = val.model.timesteps.state_dict()["policy"]["policy"]  # loaded, waiting for the first draw
    for key, value in saved["diffusion"]["timesteps"]["policy"]["policy"].items():
        assert torch.equal(restored[key], value)


def test_composes_with_the_curriculum():
    from lightning_diffusion.callbacks import TimestepCurriculum

    cb = AdaptiveTimestepSampling(update_every=2, probe_grid=6, buffer_size=3, show_subset=False)
    curriculum = TimestepCurriculum(num_clusters=4, pacing="fixed", steps_per_stage=100, verbose=False)

    class _Levels(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(outputs["level"])

    levels = _Levels()
    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[cb, curriculum, levels]).fit(_module(), _loader())
    t = torch.cat(levels.seen)
    assert (cb.sampler.u_low, cb.sampler.u_high) == (0.75, 1.0) and cb.updates == 2
    assert t.min().item() >= 750  # stage 1 of 4: the noisiest quarter only


def test_log_levels_writes_a_tensorboard_histogram(monkeypatch):
    from types import SimpleNamespace

    from lightning_diffusion.callbacks import sampler_report

    class FakeTB:
        def __init__(self):
            self.experiment = self
            self.calls = []

        def add_histogram(self, tag, values, step):
            self.calls.append((tag, values, step))

    monkeypatch.setattr(sampler_report, "TensorBoardLogger", FakeTB)
    logged = {}
    tb = FakeTB()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[tb], global_step=7)
    module = SimpleNamespace(log=lambda name, value: logged.__setitem__(name, float(value)))
    sampler_report.log_levels(trainer, module, "adaptive", torch.arange(101), discrete=True)
    assert logged == {"adaptive/t_q10": 10.0, "adaptive/t_q50": 50.0, "adaptive/t_q90": 90.0}
    sigma = torch.tensor([0.5, 1.0, 2.0])
    sampler_report.log_levels(trainer, module, "adaptive", sigma, discrete=False)
    assert [c[0] for c in tb.calls] == ["adaptive/t", "adaptive/ln_sigma"] and tb.calls[0][2] == 7
    torch.testing.assert_close(tb.calls[1][1], sigma.log())  # sigma is shown on a log axis
    assert logged["adaptive/sigma_q50"] == 1.0
