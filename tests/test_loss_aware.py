"""Loss-aware importance sampling (docs/algorithms.md 4, improved-diffusion's baseline): exact
unbiasedness, warm-up, the vectorized ring buffer, sigma bins, restrict, the callback, resume, DDP."""

from __future__ import annotations

import copy
import functools
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import stats
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import gen, quiet_trainer, tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import LossAwareTimestepSampling
from lightning_diffusion.core.noise import EDMProcess
from lightning_diffusion.core.weighting import MinSNRWeighting
from lightning_diffusion.timesteps import LogNormalSigma, LossAwareTimesteps, UniformTimesteps

ADAM = functools.partial(torch.optim.Adam, lr=2e-3)
BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")



def _warm(dist: LossAwareTimesteps, seed: int = 0) -> torch.Tensor:
    """Fill every bin's history with positive losses whose scale differs per bin; returns the scales."""
    scale = torch.rand(dist.num_bins, generator=gen(seed)) * 3 + 0.1
    bins = torch.arange(dist.num_bins).repeat(dist.history)
    dist.update_bins(bins, scale[bins] * (0.5 + torch.rand(len(bins), generator=gen(seed + 1))))
    return scale


# ---------------------------------------------------------------------- the math
@pytest.mark.parametrize("base", [UniformTimesteps(50), LogNormalSigma(-1.2, 1.2)], ids=["t", "sigma"])
@pytest.mark.parametrize("support", [(0.0, 1.0), (0.37, 0.81)])
def test_importance_weights_are_exactly_unbiased(base, support):
    dist = LossAwareTimesteps(base, history=4, num_bins=16)
    dist.restrict(*support)
    _warm(dist)
    assert bool(dist.warm) and not torch.allclose(dist.p, dist.q)  # a learned, non-base distribution
    loss = torch.rand(dist.num_bins, generator=gen(3), dtype=torch.float64)
    # sum_b p_b w_b L_b == sum_b q_b L_b: the objective under the (restricted) base density
    torch.testing.assert_close((dist.p * dist.weights.double() * loss).sum(), (dist.q * loss).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(dist.q.sum(), torch.tensor(1.0, dtype=torch.float64))
    inside = (dist.cdf_edges[1:] > support[0]) & (dist.cdf_edges[:-1] < support[1])
    assert (dist.p[~inside] == 0).all() and (dist.p[inside] > 0).all()


def test_uniform_until_warm_then_rms_of_losses_mixed_with_uniform():
    T, H, eps = 20, 3, 0.01
    dist = LossAwareTimesteps(UniformTimesteps(T), history=H, uniform_prob=eps)
    losses = torch.rand(T, H, generator=gen(0)) + 0.1
    dist.update_bins(torch.arange(T - 1).repeat_interleave(H), losses[:-1].flatten())
    dist.update_bins(torch.tensor([T - 1] * (H - 1)), losses[-1, : H - 1])  # one short of warm
    assert not bool(dist.warm)
    torch.testing.assert_close(dist.p, torch.full((T,), 1.0 / T, dtype=torch.float64))
    torch.testing.assert_close(dist.weights, torch.ones(T))
    dist.update_bins(torch.tensor([T - 1]), losses[-1, H - 1:])
    rms = losses.double().square().mean(1).sqrt()
    p = (1 - eps) * rms / rms.sum() + eps / T  # improved-diffusion's formula
    assert bool(dist.warm)
    torch.testing.assert_close(dist.p, p)
    torch.testing.assert_close(dist.weights, (1 / (T * p)).float())


def test_draws_follow_p_and_carry_their_weights():
    dist = LossAwareTimesteps(UniformTimesteps(10), history=2)
    _warm(dist)
    t, w = dist.sample(100_000, generator=gen(4))
    counts = torch.bincount(t, minlength=10).double()
    chi2 = ((counts - 1e5 * dist.p) ** 2 / (1e5 * dist.p)).sum().item()
    assert chi2 < stats.chi2.ppf(1 - 1e-4, 9)
    assert torch.equal(w, dist.weights[t])
    # Monte Carlo: E_p[w L(t)] == E_uniform[L(t)]
    loss = torch.linspace(0.1, 3.0, 10)
    assert (w * loss[t]).mean().item() == pytest.approx(loss.mean().item(), rel=0.01)


def test_ring_keeps_the_last_entries_and_ignores_padding():
    dist = LossAwareTimesteps(UniformTimesteps(5), history=4)
    values = torch.arange(1.0, 11.0)  # 10 losses for bin 3 in one vectorized update
    pad = torch.full((6,), 5)  # bin == num_bins: padding from the all-gather, ignored
    dist.update_bins(torch.cat([torch.full((10,), 3), pad]), torch.cat([values, torch.full((6,), 99.0)]))
    assert sorted(dist.ring[3].tolist()) == [7.0, 8.0, 9.0, 10.0]
    assert dist.count.tolist() == [0, 0, 0, 4, 0, 0] and dist.ring[5].abs().sum() == 0
    dist.update_bins(torch.tensor([3, 1, 3]), torch.tensor([11.0, 5.0, 12.0]))  # interleaved with bin 1
    assert sorted(dist.ring[3].tolist()) == [9.0, 10.0, 11.0, 12.0]
    assert dist.ring[1].tolist() == [5.0, 0.0, 0.0, 0.0] and dist.count[1].item() == 1
    for k in range(13, 16):  # one at a time: the oldest goes first
        dist.update_bins(torch.tensor([3]), torch.tensor([float(k)]))
    assert sorted(dist.ring[3].tolist()) == [12.0, 13.0, 14.0, 15.0]


def test_sigma_bins_log_grid_and_draws_inside_their_bin():
    base = LogNormalSigma(-1.2, 1.2)
    dist = LossAwareTimesteps(base, history=2, num_bins=32)
    log_edges = dist.log_edges
    torch.testing.assert_close(log_edges.diff(), torch.full((30,), log_edges.diff()[0].item(), dtype=torch.float64))
    ends = base.icdf(torch.tensor([1e-3, 1 - 1e-3], dtype=torch.float64)).double().log()
    torch.testing.assert_close((log_edges[0] - ends[0]) * 32, ends[1] - ends[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(dist.q, dist.cdf_edges.diff())
    sigma, w = dist.sample(50_000, generator=gen(5))
    assert torch.equal(w, torch.ones(50_000))  # the base density until warm
    assert stats.kstest(sigma.double().numpy(), lambda s: base.cdf(torch.as_tensor(s)).numpy()).pvalue > 1e-3
    _warm(dist)
    sigma, w = dist.sample(50_000, generator=gen(6))
    b = dist.bin_of(sigma)  # each draw lies in the bin it was drawn for: its weight and the bin frequencies agree
    assert torch.equal(w, dist.weights[b])
    counts = torch.bincount(b, minlength=32).double()
    assert ((counts - 5e4 * dist.p) ** 2 / (5e4 * dist.p)).sum().item() < stats.chi2.ppf(1 - 1e-4, 31)


def test_restricted_draws_match_the_restricted_base_until_warm():
    dist = LossAwareTimesteps(UniformTimesteps(1000), history=2)
    dist.restrict(0.85, 1.0)  # a curriculum's stage 3 of 20
    t, w = dist.sample(20_000, generator=gen(7))
    assert t.min().item() == 850 and t.max().item() == 999 and torch.equal(w, torch.ones(20_000))
    # warm-up needs only the bins in range
    dist.update_bins(torch.arange(850, 1000).repeat(2), torch.rand(300, generator=gen(8)) + 0.1)
    assert bool(dist.warm) and dist.p[:850].sum() == 0


def test_state_round_trip_reproduces_the_next_draw():
    dist = LossAwareTimesteps(LogNormalSigma(), history=3, num_bins=8)
    _warm(dist)
    dist.restrict(0.1, 0.9)
    fresh = LossAwareTimesteps(LogNormalSigma(), history=3, num_bins=8)
    fresh.load_state_dict(copy.deepcopy(dist.state_dict()))
    a, b = dist.sample(64, generator=gen(9)), fresh.sample(64, generator=gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    plain = LossAwareTimesteps(LogNormalSigma(), history=3, num_bins=8)
    plain.load_state_dict({"u_low": 0.5, "u_high": 1.0})  # a checkpoint of the plain base density
    assert plain.u_low == 0.5 and plain.count.sum() == 0
    with pytest.raises(ValueError, match="history=4"):
        LossAwareTimesteps(LogNormalSigma(), history=4, num_bins=8).load_state_dict(dist.state_dict())


# ---------------------------------------------------------------------- the callback
def _module(**kwargs) -> DiffusionLightningModule:
    torch.manual_seed(0)
    return DiffusionLightningModule(tiny_unet(), optimizer=ADAM, **kwargs)


def _loader(n: int = 16) -> DataLoader:
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)  # identical batches: exact resume
    return DataLoader(TensorDataset(image.expand(n, 1, 8, 8).clone()), batch_size=BATCH)


class _Record(pl.Callback):
    """Keeps every micro-batch's drawn levels, per-sample losses and importance weights."""

    def __init__(self):
        self.level, self.loss, self.weight, self.expected = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.level.append(outputs["level"])
        self.loss.append(outputs["per_sample_loss"])
        self.weight.append(outputs["importance_weight"])
        sampler = pl_module.timesteps  # placed before the sampler's callback: weights of the draw
        self.expected.append(sampler.weights[sampler.bin_of(outputs["level"])])


@pytest.mark.parametrize("edm", [False, True])
def test_history_holds_the_min_snr_weighted_losses_once_per_step(edm):
    cb = LossAwareTimestepSampling(history=1000, num_bins=16)  # large: nothing is overwritten
    record = _Record()
    module = _module(process=EDMProcess() if edm else None, prediction="x0" if edm else "v",
                     weighting=MinSNRWeighting(5.0))
    quiet_trainer(max_steps=3, accumulate_grad_batches=2, limit_val_batches=0,
                  callbacks=[record, cb]).fit(module, _loader(48))
    sampler = cb.sampler
    assert module.timesteps is sampler and sampler.count.sum().item() == 3 * 2 * BATCH
    level, loss = torch.cat(record.level), torch.cat(record.loss)
    for b in sampler.bin_of(level).unique().tolist():
        n = sampler.count[b].item()
        assert sorted(sampler.ring[b, :n].tolist()) == sorted(loss[sampler.bin_of(level) == b].tolist())


def test_weights_reach_the_loss_once_warm():
    cb = LossAwareTimestepSampling(history=1, num_bins=3)
    record = _Record()
    quiet_trainer(max_steps=6, limit_val_batches=0, callbacks=[record, cb]).fit(
        _module(process=EDMProcess(), prediction="x0"), _loader(48))
    assert bool(cb.sampler.warm)  # 3 bins (base mass 0.15, 0.7, 0.15), 1 loss each: warm within a few steps
    assert torch.equal(record.weight[0], torch.ones(BATCH))
    assert not torch.equal(record.weight[-1], torch.ones(BATCH))
    for weight, expected in zip(record.weight, record.expected):
        assert torch.equal(weight, expected)  # the module's loss used q_b / p_b of each draw


def _fit(tmp_path, name, max_steps, ckpt_path=None, every_n_train_steps=None):
    cb = LossAwareTimestepSampling(history=2)
    callbacks = [cb]
    if every_n_train_steps:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=every_n_train_steps,
                                         save_top_k=-1, filename="{step}"))
    module = _module()
    quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=callbacks,
                  enable_checkpointing=bool(every_n_train_steps)).fit(module, _loader(), ckpt_path=ckpt_path)
    return cb, module


def test_history_is_checkpointed_and_resume_is_exact(tmp_path):
    straight, a = _fit(tmp_path, "a", 6)
    _fit(tmp_path, "b", 3, every_n_train_steps=3)
    ckpt = tmp_path / "b" / "step=3.ckpt"
    raw = torch.load(ckpt, weights_only=True)["diffusion"]["timesteps"]  # plain state only
    assert raw["count"].sum().item() == 3 * BATCH
    resumed, b = _fit(tmp_path, "b", 6, ckpt_path=ckpt)
    for key in ("ring", "ptr", "count"):
        assert torch.equal(getattr(straight.sampler, key), getattr(resumed.sampler, key))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="history=0"):
        LossAwareTimestepSampling(history=0)
    with pytest.raises(ValueError, match="uniform_prob=1.5"):
        LossAwareTimestepSampling(uniform_prob=1.5)
    with pytest.raises(ValueError, match="num_bins=1"):
        LossAwareTimestepSampling(num_bins=1)


# ---------------------------------------------------------------------- DDP, unequal batches
class _RankSized(Dataset):
    """12 images on rank 0 and 10 on rank 1: batches of 8+4 and 8+2 (no DistributedSampler)."""

    def __len__(self):
        import torch.distributed as dist
        return 12 if dist.get_rank() == 0 else 10

    def __getitem__(self, i):
        return (torch.full((1, 8, 8), -1.0 + 0.1 * i),)


class _DumpHistory(pl.Callback):
    def __init__(self, cb: LossAwareTimestepSampling, directory: str):
        self.cb, self.directory = cb, directory

    def on_train_end(self, trainer, pl_module):
        torch.save(self.cb.sampler.state_dict(), os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


@pytest.mark.timeout(120)
def test_ddp_ranks_hold_the_same_history_with_unequal_batches(tmp_path):
    cb = LossAwareTimestepSampling(history=50)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, devices=2, strategy="ddp_spawn",
                            use_distributed_sampler=False, callbacks=[cb, _DumpHistory(cb, str(tmp_path))])
    trainer.fit(_module(), DataLoader(_RankSized(), batch_size=8))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["count"].sum().item() == 12 + 10  # both ranks' losses, and no padding
    for key in ("ring", "ptr", "count"):
        assert torch.equal(r0[key], r1[key])


# ---------------------------------------------------------------------- the shipped recipe
def test_config_trains_logs_the_distribution_and_validates_from_its_checkpoint(tmp_path, monkeypatch):
    import csv
    from pathlib import Path

    from lightning_diffusion.cli import DiffusionCLI

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "loss_aware.yaml"),
            "--model.init_args.net.init_args.model_channels=16",
            "--model.init_args.net.init_args.attention_resolutions=[]",
            "--model.init_args.fd_samples=0", "--data.init_args.batch_size=16", "--trainer.max_steps=6",
            "--trainer.val_check_interval=6", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=3",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    cli = DiffusionCLI(args=["fit", *args])
    log_dir = Path(cli.trainer.log_dir)
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss_aware/mass_q0")]
    assert [int(r["step"]) for r in rows] == [2, 5]
    for r in rows:  # not warm yet (10 losses for each of 1000 t): the uniform quarters
        assert float(r["loss_aware/warm"]) == 0.0 and float(r["loss_aware/max_weight"]) == 1.0
        assert sum(float(r[f"loss_aware/mass_q{k}"]) for k in range(4)) == pytest.approx(1.0)
        assert float(r["loss_aware/mass_q0"]) == pytest.approx(0.25)
    ckpt = next((log_dir / "checkpoints").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)["diffusion"]["timesteps"]
    assert saved["count"].sum().item() == 6 * 16
    val = DiffusionCLI(args=["validate", *args, f"--ckpt_path={ckpt}"])
    assert torch.equal(val.model.timesteps.count, saved["count"])


def test_composes_with_the_curriculum():
    from lightning_diffusion.callbacks import TimestepCurriculum

    cb = LossAwareTimestepSampling(history=2)
    curriculum = TimestepCurriculum(num_clusters=4, pacing="fixed", steps_per_stage=100, verbose=False)
    record = _Record()
    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[cb, curriculum, record]).fit(_module(), _loader())
    t = torch.cat(record.level)
    assert (cb.sampler.u_low, cb.sampler.u_high) == (0.75, 1.0)
    assert t.min().item() >= 750 and cb.sampler.p[:750].sum() == 0
    assert cb.sampler.count[:750].sum() == 0 and cb.sampler.count.sum() == 4 * BATCH
