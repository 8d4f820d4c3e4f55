"""Stable Target Field (docs/algorithms.md 2): the formula, its limits, masking, sources and the module."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.references import FreshReferences, QueueReferences, duplicate_mask
from lightning_diffusion.core.targets import StableTargetField, StandardTarget, stf_target
from lightning_diffusion.data import DigitsDataModule


def brute_force(x, a, s, refs, allowed=None):
    """The defining formula on a [B, n, d] tensor in float64 (tiny inputs only)."""
    x, refs = x.flatten(1).double(), refs.flatten(1).double()
    a, s = a.double()[:, None], s.double()[:, None]
    logits = -(x[:, None, :] - a[:, :, None] * refs[None]).square().sum(-1) / (2 * s**2)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    return torch.softmax(logits, 1) @ refs


def test_single_reference_is_the_standard_target_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(1, 3, 4, 4, generator=gen)
    noise = torch.randn(y.shape, generator=gen)
    for process, prediction, level in [(EDMProcess(), "x0", torch.tensor([0.7])),
                                       (VPProcess(num_timesteps=100), "x0", torch.tensor([40]))]:
        param = Parametrization(process, prediction)
        x = process.add_noise(y, noise, level)
        stf = StableTargetField(reference_size=1, source="batch")(param, y, noise, x, level)
        assert torch.equal(stf, StandardTarget()(param, y, noise, x, level))
    # eps and v targets are derived from the x0 target: equal up to rounding.
    for prediction in ["eps", "v"]:
        process = VPProcess(num_timesteps=100)
        param = Parametrization(process, prediction)
        level = torch.tensor([40])
        x = process.add_noise(y, noise, level)
        stf = StableTargetField(reference_size=1, source="batch")(param, y, noise, x, level)
        torch.testing.assert_close(stf, param.target(y, noise, level), atol=1e-5, rtol=1e-5)


def test_limits_small_sigma_gives_own_image_large_sigma_gives_reference_mean():
    gen = torch.Generator().manual_seed(1)
    refs = torch.randn(32, 1, 8, 8, generator=gen)
    y = refs[:4]
    x = y + 1e-3 * torch.randn(y.shape, generator=gen)
    torch.testing.assert_close(stf_target(x, 1e-3, refs), y)
    far = y + 1e4 * torch.randn(y.shape, generator=gen)
    torch.testing.assert_close(stf_target(far, 1e4, refs), refs.mean(0).expand_as(y), atol=1e-3, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_agrees_with_float64_brute_force_edm_and_vp(chunk_size):
    gen = torch.Generator().manual_seed(2)
    refs = torch.randn(11, 2, 3, 3, generator=gen)
    y = refs[:3]
    sigma = torch.tensor([0.3, 1.0, 3.0])
    x = y + sigma[:, None, None, None] * torch.randn(y.shape, generator=gen)
    expected = brute_force(x, torch.ones(3), sigma, refs).reshape(y.shape)
    torch.testing.assert_close(stf_target(x, sigma, refs, chunk_size=chunk_size).double(), expected, atol=2e-5, rtol=1e-4)
    assert stf_target(x.double(), sigma.double(), refs.double(), chunk_size=chunk_size).dtype == torch.float64
    torch.testing.assert_close(stf_target(x.double(), sigma.double(), refs.double(), chunk_size=chunk_size), expected,
                               atol=1e-12, rtol=1e-12)
    # VP form: x = a y + s n, logits -||x - a r||^2 / (2 s^2).
    a, s = VPProcess(num_timesteps=100).alpha_sigma(torch.tensor([5, 50, 95]))
    xv = a[:, None, None, None] * y + s[:, None, None, None] * torch.randn(y.shape, generator=gen)
    expected = brute_force(xv, a, s, refs).reshape(y.shape)
    got = stf_target(xv.double(), s.double(), refs.double(), scale=a.double(), chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_permutation_invariance():
    gen = torch.Generator().manual_seed(3)
    refs = torch.randn(20, 1, 4, 4, generator=gen)
    x = refs[:5] + 0.8 * torch.randn(5, 1, 4, 4, generator=gen)
    perm = torch.randperm(20, generator=gen)
    inverse = torch.argsort(perm)
    own = torch.arange(5)
    torch.testing.assert_close(stf_target(x, 0.8, refs, own),
                               stf_target(x, 0.8, refs[perm], inverse[own]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_plus_minus_one_toy_is_tanh(sigma):
    refs = torch.tensor([1.0, -1.0]).repeat(500).reshape(1000, 1)
    x = torch.linspace(-3, 3, 13).reshape(13, 1)
    torch.testing.assert_close(stf_target(x, sigma, refs, own_index=torch.zeros(13, dtype=torch.long)),
                               torch.tanh(x / sigma**2), atol=1e-6, rtol=1e-5)


def test_class_masking_and_null_label():
    gen = torch.Generator().manual_seed(4)
    refs = torch.randn(12, 1, 2, 2, generator=gen)
    ref_labels = torch.arange(12) % 3
    x = refs[:3] + 2.0 * torch.randn(3, 1, 2, 2, generator=gen)
    labels = torch.tensor([0, 1, 3])  # 3 is the null label: attends to every reference
    got = stf_target(x, 2.0, refs, labels=labels, ref_labels=ref_labels, null_label=3)
    allowed = (labels[:, None] == ref_labels[None]) | (labels == 3)[:, None]
    allowed[2, 2] = True  # the own image is always present
    expected = brute_force(x, torch.ones(3), torch.full((3,), 2.0), refs, allowed).reshape(x.shape)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    # Sample 2's own image (label 2) stays although its (null) label differs: present exactly once.
    unmasked = stf_target(x, 2.0, refs)
    torch.testing.assert_close(got[2], unmasked[2])


def test_duplicates_of_batch_images_are_excluded_own_kept():
    gen = torch.Generator().manual_seed(5)
    batch = torch.randn(4, 1, 8, 8, generator=gen)
    extras = torch.randn(6, 1, 8, 8, generator=gen)
    extras[2], extras[5] = batch[1], batch[3]
    mask = duplicate_mask(batch, torch.cat([batch, extras]))
    assert mask.tolist() == [False] * 4 + [False, False, True, False, False, True]


def test_stf_has_lower_target_variance_than_the_standard_target():
    """Error of each target against the ideal field E[y | x] (STF over the whole data set), sigma = 1."""
    data = DigitsDataModule(batch_size=64).train_dataset.images.float() / 127.5 - 1
    gen = torch.Generator().manual_seed(6)
    errs_std, errs_stf = [], []
    for _ in range(4):
        idx = torch.randperm(data.shape[0], generator=gen)
        y, extra = data[idx[:64]], data[idx[64:64 + 448]]
        x = y + torch.randn(y.shape, generator=gen)
        # The ideal field: all data, own image first (own index = position in the permuted set).
        ideal = stf_target(x, 1.0, data[idx], torch.arange(64))
        stf = stf_target(x, 1.0, torch.cat([y, extra]))
        errs_std.append((y - ideal).square().mean())
        errs_stf.append((stf - ideal).square().mean())
    assert torch.stack(errs_stf).mean() < 0.5 * torch.stack(errs_std).mean()


class _Run:
    """The bits of a module a reference source reads in ``setup``."""

    def __init__(self, datamodule, rank=0):
        self.trainer = type("T", (), {"datamodule": datamodule})()
        self.global_rank = rank
        self.num_classes = datamodule.num_classes


def test_fresh_source_stream_resumes_exactly_and_differs_per_rank():
    data = DigitsDataModule(batch_size=16)
    batch = data.train_dataset.get_batch(torch.arange(16))[0]
    source = FreshReferences(reference_size=64, seed=3)
    source.setup(_Run(data))
    first = [source.references(batch, None).images for _ in range(3)]
    assert all(r.shape == (64, 1, 8, 8) for r in first)
    assert torch.equal(first[0][:16], batch)
    resumed = FreshReferences(reference_size=64, seed=3)
    resumed.setup(_Run(data))
    state = FreshReferences(reference_size=64, seed=3)
    state.consumed = 2
    resumed.load_state_dict(state.state_dict())
    assert torch.equal(resumed.references(batch, None).images, first[2])
    other = FreshReferences(reference_size=64, seed=3)
    other.setup(_Run(data, rank=1))
    assert not torch.equal(other.references(batch, None).images, first[0])


def test_fresh_source_refuses_a_reference_size_below_the_batch():
    with pytest.raises(ValueError, match=r"reference_size=8 must be >= the per-device batch size 16"):
        FreshReferences(reference_size=8).setup(_Run(DigitsDataModule(batch_size=16)))


def test_queue_source_is_a_fifo_and_round_trips():
    source = QueueReferences(reference_size=6)
    batches = [torch.full((2, 1, 1, 1), float(k)) for k in range(4)]
    for b in batches:
        refs = source.references(b, None).images
        source.after_step(b, None)
    # Capacity 4: before the last push the queue holds batches 0..2's last 4 images (1, 1, 2, 2).
    assert sorted(refs[2:].flatten().tolist()) == [1.0, 1.0, 2.0, 2.0]
    assert sorted(source.images.flatten().tolist()) == [2.0, 2.0, 3.0, 3.0]
    copy = QueueReferences(reference_size=6)
    copy.load_state_dict(source.state_dict())
    assert torch.equal(copy.references(batches[0], None).images, source.references(batches[0], None).images)


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match=r"StableTargetField.source='nearest' must be one of"):
        StableTargetField(source="nearest")
    with pytest.raises(ValueError, match=r"StableTargetField.reference_size=0 must be >= 1"):
        StableTargetField(reference_size=0)
