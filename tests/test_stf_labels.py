"""Class-conditional STF with guidance label dropout (docs/algorithms.md 2): references keep their true labels.

Dropout hides a label from the network only: the reference set (and the FIFO queue) keep every
image's true class; a sample whose own label was dropped attends to all references, the others
to references of their (true) class.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.core.noise import EDMProcess
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.targets import StableTargetField

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 3


def _field(x, sigma, refs, allowed):
    """The defining formula (float64, brute force): softmax_j(-||x_i - r_j||^2 / (2 sigma_i^2)) over allowed j."""
    x, refs = x.flatten(1).double(), refs.flatten(1).double()
    logits = -(x[:, None] - refs[None]).square().sum(-1) / (2 * sigma.double()[:, None] ** 2)
    return torch.softmax(logits.masked_fill(~allowed, -math.inf), 1) @ refs


def _labelled_images(n, generator):
    """Images whose mean encodes the class (so a queued image's true class can be read back)."""
    labels = torch.arange(n) % CLASSES
    images = (labels.float() - 1.0)[:, None, None, None] + 0.05 * torch.randn(n, 1, 8, 8, generator=generator)
    return images, labels


def _module(source, reference_size, process=None):
    module = DiffusionLightningModule(
        tiny_unet(num_classes=CLASSES), process=process or EDMProcess(), prediction="x0", num_classes=CLASSES,
        label_dropout=0.5, target=_SpySTF(reference_size=reference_size, source=source, class_conditional=True))
    module.target.setup(SimpleNamespace(num_classes=CLASSES, trainer=None))  # learns the null label
    return module


class _SpySTF(StableTargetField):
    """Records the draw and the x0 target of the last call."""

    def __call__(self, param, x0, noise, x_noisy, level, class_labels=None, **kwargs):
        out = super().__call__(param, x0, noise, x_noisy, level, class_labels, **kwargs)
        self.seen = {"x_noisy": x_noisy, "level": level, "target": out}
        return out


def test_queue_keeps_true_labels_with_dropout():
    module = _module("queue", reference_size=96)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(20):
            x0, labels = _labelled_images(32, g)
            module.diffusion_loss(x0, labels, module.step_generator(x0.device, step))
    source = module.target.source
    assert source.count == 64
    true = source.images[: source.count].mean((1, 2, 3)).round().long() + 1
    assert torch.equal(source.labels[: source.count], true)  # no null label (3) in the queue


def test_dropped_samples_use_all_references_kept_ones_their_true_class():
    # High noise (sigma ~ e^1) so the class mask visibly changes the targets.
    module = _module("batch", reference_size=1, process=EDMProcess(P_mean=1.0, P_std=0.2))
    net_labels = []
    module.net.register_forward_pre_hook(lambda net, args: net_labels.append(args[2]))
    g = torch.Generator().manual_seed(1)
    x0, labels = _labelled_images(24, g)
    x0 = x0 + 0.5 * torch.randn(x0.shape, generator=g)  # classes overlap: every reference counts
    with torch.no_grad():
        module.diffusion_loss(x0, labels, module.step_generator(x0.device, 0))
    seen, given = module.target.seen, net_labels[0]
    dropped = given == CLASSES
    assert dropped.any() and (~dropped).any()
    assert torch.equal(given[~dropped], labels[~dropped])  # kept samples see their own label
    allowed = torch.where(dropped[:, None], torch.ones(24, 24, dtype=torch.bool), labels[:, None] == labels[None])
    expected = _field(seen["x_noisy"], seen["level"], x0, allowed).reshape(x0.shape)
    torch.testing.assert_close(seen["target"].double(), expected, atol=1e-5, rtol=1e-5)
    # The two rules differ here (else the test would not tell them apart).
    masked = _field(seen["x_noisy"], seen["level"], x0, labels[:, None] == labels[None]).reshape(x0.shape)
    assert (masked - expected)[dropped].abs().max() > 1e-2


def test_target_reads_data_labels_for_references_and_class_labels_for_rows():
    g = torch.Generator().manual_seed(2)
    x0, labels = _labelled_images(9, g)
    process = EDMProcess()
    param = Parametrization(process, "x0")
    sigma = torch.full((9,), 2.0)
    x = process.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    given = labels.clone()
    given[[0, 4]] = CLASSES  # dropped
    stf = StableTargetField(reference_size=1, source="batch", class_conditional=True)
    stf.setup(SimpleNamespace(num_classes=CLASSES, trainer=None))
    got = stf(param, x0, None, x, sigma, given, data_labels=labels)
    allowed = labels[:, None] == labels[None]
    allowed[[0, 4]] = True
    torch.testing.assert_close(got.double(), _field(x, sigma, x0, allowed).reshape(x0.shape), atol=1e-5, rtol=1e-5)
    # Without data_labels the class labels describe both (the unconditional / no-dropout case).
    same = stf(param, x0, None, x, sigma, labels)
    torch.testing.assert_close(same.double(), _field(x, sigma, x0, labels[:, None] == labels[None]).reshape(x0.shape),
                               atol=1e-5, rtol=1e-5)
