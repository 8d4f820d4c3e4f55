"""Min-SNR at SNR == 0 (zero terminal SNR, docs/algorithms.md 0-1): the default and the ``zero_snr_weight`` option."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.core.noise import VPProcess
from lightning_diffusion.core.precondition import Parametrization
from lightning_diffusion.core.weighting import MinSNRWeighting, min_snr_weight

ZTSNR = VPProcess("linear", 1000, zero_terminal_snr=True)
LAST = torch.tensor([997, 998, 999])


def mse(a, b):
    return (a - b).square().flatten(1).mean(1)


def test_default_is_the_formula_and_its_limit_zero():
    snr = ZTSNR.snr(LAST)
    assert snr[-1].item() == 0.0 and (snr[:-1] > 0).all()
    w = MinSNRWeighting(5.0)
    for prediction, expected in (("x0", snr), ("v", snr / (snr + 1)), ("eps", torch.ones(3))):
        torch.testing.assert_close(w(snr, prediction), expected.float(), rtol=1e-6, atol=0)
    assert w(snr, "x0")[-1].item() == 0.0 and w(snr, "v")[-1].item() == 0.0 and w(snr, "eps")[-1].item() == 1.0
    assert w.zero_snr_weight == 0.0


@pytest.mark.parametrize("value", [1.0, 0.25])
def test_zero_snr_weight_on_plain_tensors(value):
    snr = torch.tensor([0.0, 1e-6, 1.0, 10.0])
    w = MinSNRWeighting(5.0, zero_snr_weight=value)
    torch.testing.assert_close(w(snr, "x0"), torch.tensor([value, 1e-6, 1.0, 5.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(w(snr, "v"), torch.tensor([value, 1e-6 / (1 + 1e-6), 0.5, 5 / 11]), rtol=1e-6, atol=0)
    torch.testing.assert_close(w(snr, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.5]), rtol=1e-6, atol=0)
    # Away from SNR == 0 nothing changes; min_snr_weight (the public function) keeps the formula.
    torch.testing.assert_close(w(snr[1:], "v"), min_snr_weight(snr[1:], 5.0, "v"))
    assert min_snr_weight(snr, 5.0, "v")[0].item() == 0.0


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_zero_snr_weight_is_an_x0_space_weight_at_the_last_step(prediction):
    """At SNR == 0 (a = 0, s = 1), v = -x0, so w_pred * mse(out, target) == zero_snr_weight * mse(x0_hat, x0)."""
    param = Parametrization(ZTSNR, prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.full((4,), 999)
    x_t = ZTSNR.add_noise(x0, eps, t)
    w = MinSNRWeighting(5.0, zero_snr_weight=0.7)(ZTSNR.snr(t), prediction).double()
    lhs = w * mse(out, param.target(x0, eps, t))
    torch.testing.assert_close(lhs, 0.7 * mse(param.to_x0(out, x_t, t), x0), rtol=1e-6, atol=0)


def test_module_uses_zero_snr_weight_at_the_terminal_step():
    module = DiffusionLightningModule(tiny_unet(), process=ZTSNR, prediction="v",
                                      weighting=MinSNRWeighting(5.0, zero_snr_weight=1.0))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    _, _, _, weight = module.weighted_mse(x0, noise, LAST, None)
    snr = ZTSNR.snr(LAST)
    torch.testing.assert_close(weight, torch.stack([snr[0] / (snr[0] + 1), snr[1] / (snr[1] + 1), torch.tensor(1.0)]))


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_bad_zero_snr_weight_names_the_setting(bad):
    with pytest.raises(ValueError, match=r"MinSNRWeighting.zero_snr_weight=.* must be finite and >= 0"):
        MinSNRWeighting(5.0, zero_snr_weight=bad)
