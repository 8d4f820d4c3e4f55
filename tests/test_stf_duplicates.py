"""STF reference sets hold each sample's own image exactly once, duplicates included (docs/algorithms.md 2).

A copy of sample i's own image elsewhere in the references (a batch duplicate, a queued or fresh
copy of the same item) is dropped for sample i only; other samples keep every reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.references import own_duplicates
from lightning_diffusion.core.targets import StableTargetField


def _field(x, a, s, refs, keep=None):
    """The defining formula in float64 on [B, n, d]: softmax_j(-||x_i - a_i r_j||^2 / (2 s_i^2)) r_j."""
    x, refs = x.flatten(1).double(), refs.flatten(1).double()
    a, s = a.double()[:, None, None], s.double()[:, None]
    logits = -(x[:, None] - a * refs[None]).square().sum(-1) / (2 * s**2)
    if keep is not None:
        logits = logits.masked_fill(~keep, -math.inf)
    return torch.softmax(logits, 1) @ refs


def _draw(process, images, level, seed):
    g = torch.Generator().manual_seed(seed)
    x = process.add_noise(images, torch.randn(images.shape, generator=g), level)
    a, s = process.alpha_sigma(level)
    return x, a, s


CASES = [(EDMProcess(), torch.full((5,), 1.5)), (VPProcess(num_timesteps=100), torch.full((5,), 60))]


@pytest.mark.parametrize("process, level", CASES, ids=["edm", "vp"])
@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_two_identical_batch_images_each_see_their_image_once(process, level, chunk_size):
    g = torch.Generator().manual_seed(0)
    batch = 0.5 * torch.randn(5, 1, 4, 4, generator=g)
    batch[3] = batch[1]
    x, a, s = _draw(process, batch, level, 1)
    stf = StableTargetField(reference_size=1, source="batch", chunk_size=chunk_size)
    got = stf(Parametrization(process, "x0"), batch, None, x, level).double().flatten(1)
    for i, duplicate in ((1, 3), (3, 1)):  # the target computed with the duplicate removed
        rest = [j for j in range(5) if j != duplicate]
        expected = _field(x[i : i + 1], a[i : i + 1], s[i : i + 1], batch[rest])
        torch.testing.assert_close(got[i : i + 1], expected, atol=1e-5, rtol=1e-5)
    others = [0, 2, 4]  # their own image is unique: every reference, both copies included
    torch.testing.assert_close(got[others], _field(x[others], a[others], s[others], batch), atol=1e-5, rtol=1e-5)


def test_a_queued_copy_of_the_own_image_is_dropped_for_that_sample_only():
    g = torch.Generator().manual_seed(2)
    old = 0.5 * torch.randn(4, 1, 4, 4, generator=g)
    batch = 0.5 * torch.randn(4, 1, 4, 4, generator=g)
    batch[2] = old[1]  # the same item again, one step later
    stf = StableTargetField(reference_size=8, source="queue")
    stf.source.after_step(old, None)
    process, level = EDMProcess(), torch.full((4,), 1.0)
    x, a, s = _draw(process, batch, level, 3)
    got = stf(Parametrization(process, "x0"), batch, None, x, level).double().flatten(1)
    refs = torch.cat([batch, old])
    keep = torch.ones(4, 8, dtype=torch.bool)
    keep[2, 5] = False  # sample 2's own image is at 2; the queued copy at 4 + 1 goes
    torch.testing.assert_close(got, _field(x, a, s, refs, keep), atol=1e-5, rtol=1e-5)


def test_own_duplicates_mask():
    g = torch.Generator().manual_seed(4)
    refs = torch.randn(9, 3, 8, 8, generator=g)
    refs[4], refs[7], refs[8] = refs[0], refs[0], refs[2]
    own = torch.tensor([0, 2, 4])  # sample 2's own image is a copy of sample 0's
    mask = own_duplicates(refs, own)
    expected = torch.zeros(3, 9, dtype=torch.bool)
    expected[0, [4, 7]] = True
    expected[1, 8] = True
    expected[2, [0, 7]] = True
    assert torch.equal(mask, expected)
    assert torch.equal(own_duplicates(refs[:4], None), torch.zeros(4, 4, dtype=torch.bool))
    # Float64 references and a one-level change of one pixel (a different image) are told apart.
    near = refs.double().clone()
    near[4, 0, 0, 0] += 1 / 127.5
    assert own_duplicates(near, own)[0].nonzero().flatten().tolist() == [7]

