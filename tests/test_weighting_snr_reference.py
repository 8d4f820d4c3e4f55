"""Sigma-based weightings (EDM lambda, soft-min-SNR) under both EDM SNR references (docs/algorithms.md 0, 1).

The EDM process may define ``SNR = 1/sigma^2`` ("unit") or ``sd^2/sigma^2`` ("sigma_data"); a
weighting written in sigma must recover ``sigma^2 = ref/SNR`` with the process's reference.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.core.noise import EDMProcess, VPProcess
from lightning_diffusion.core.precondition import Parametrization, edm_coefficients
from lightning_diffusion.core.weighting import EDMWeighting, SoftMinSNRWeighting

SIGMA = torch.tensor([0.1, 0.5, 2.0])
REFERENCES = ["unit", "sigma_data"]


def _module(process, weighting, prediction="x0"):
    return DiffusionLightningModule(tiny_unet(), process=process, prediction=prediction, weighting=weighting)


def _lambda(sigma, sd):
    return (sigma**2 + sd**2) / (sigma * sd) ** 2  # EDM lambda = 1 / c_out^2


@pytest.mark.parametrize("reference", REFERENCES)
def test_edm_lambda_in_the_module_for_both_references(reference):
    process = EDMProcess(sigma_data=0.5, snr_reference=reference)
    module = _module(process, EDMWeighting())
    w = module.weighting(process.snr(SIGMA), "x0")
    torch.testing.assert_close(w, _lambda(SIGMA, 0.5), rtol=1e-6, atol=0)
    assert w.tolist() == pytest.approx([104.0, 8.0, 4.25], rel=1e-6)
    # The weight the training loss uses (module.weighted_mse) is the same.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    _, _, _, weight = module.weighted_mse(x0, noise, SIGMA, None)
    torch.testing.assert_close(weight, _lambda(SIGMA, 0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("reference", REFERENCES)
def test_soft_min_snr_in_the_module_for_both_references(reference):
    process = EDMProcess(sigma_data=0.5, snr_reference=reference)
    module = _module(process, SoftMinSNRWeighting())
    w = module.weighting(process.snr(SIGMA), "x0")
    torch.testing.assert_close(w, 1 / (SIGMA**2 + 0.25), rtol=1e-6, atol=0)  # 3.846, 2, 0.2353


@pytest.mark.parametrize("reference", REFERENCES)
def test_weightings_follow_the_process_sigma_data(reference):
    process = EDMProcess(sigma_data=1.0, snr_reference=reference)
    snr = process.snr(SIGMA)
    torch.testing.assert_close(_module(process, EDMWeighting()).weighting(snr, "x0"), _lambda(SIGMA, 1.0),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(_module(process, SoftMinSNRWeighting()).weighting(snr, "x0"), 1 / (SIGMA**2 + 1.0),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("reference", REFERENCES)
def test_standalone_snr_reference_argument(reference):
    snr = EDMProcess(sigma_data=0.5, snr_reference=reference).snr(SIGMA)
    w = EDMWeighting(sigma_data=0.5, snr_reference=reference)(snr, "x0")
    torch.testing.assert_close(w, _lambda(SIGMA, 0.5), rtol=1e-6, atol=0)
    w = SoftMinSNRWeighting(sigma_data=0.5, snr_reference=reference)(snr, "x0")
    torch.testing.assert_close(w, 1 / (SIGMA**2 + 0.25), rtol=1e-6, atol=0)


class _RandomF(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, c_noise, class_labels=None):
        return self.f


@pytest.mark.parametrize("reference", REFERENCES)
def test_edm_lambda_makes_the_raw_network_loss_unweighted(reference):
    """lambda(sigma) * mse(D, y) == mse(F, F_target) under either reference (lambda = 1/c_out^2)."""
    process = EDMProcess(sigma_data=0.5, snr_reference=reference)
    module = _module(process, EDMWeighting())
    g = torch.Generator().manual_seed(4)
    y = 0.5 * torch.randn(16, 1, 4, 4, generator=g)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(16, generator=g))
    x = process.add_noise(y, torch.randn(y.shape, generator=g), sigma)
    f = torch.randn(y.shape, generator=g)
    D = Parametrization(process, "x0").predict(_RandomF(f), x, sigma)
    c_skip, c_out, _, _ = edm_coefficients(sigma, 0.5)
    f_target = (y - c_skip.view(-1, 1, 1, 1) * x) / c_out.view(-1, 1, 1, 1)
    lhs = module.weighting(process.snr(sigma), "x0") * (D - y).square().flatten(1).mean(1)
    torch.testing.assert_close(lhs, (f - f_target).square().flatten(1).mean(1), rtol=1e-4, atol=1e-6)


def test_vp_processes_keep_the_unit_reference():
    process = VPProcess("cosine", 1000)
    t = torch.tensor([0, 250, 500, 900])
    snr = process.snr(t).double()
    sigma2 = 1 / snr  # VP in scaled (VE) form: sigma^2 = (1 - abar) / abar = 1/SNR
    module = _module(process, SoftMinSNRWeighting(), prediction="v")
    w_x0 = 1 / (sigma2 + 0.25)
    torch.testing.assert_close(module.weighting(snr.float(), "v").double(), w_x0 / (snr + 1), rtol=1e-5, atol=0)
    module = _module(process, EDMWeighting(), prediction="eps")
    torch.testing.assert_close(module.weighting(snr.float(), "eps").double(), _lambda(sigma2.sqrt(), 0.5) / snr,
                               rtol=1e-5, atol=0)


def test_mismatches_are_refused_at_module_construction():
    with pytest.raises(ValueError, match=r"EDMWeighting.sigma_data=0.5 does not match EDMProcess.sigma_data=1.0"):
        _module(EDMProcess(sigma_data=1.0), EDMWeighting(sigma_data=0.5))
    with pytest.raises(ValueError, match=r"SoftMinSNRWeighting.snr_reference='unit' does not match"):
        _module(EDMProcess(snr_reference="sigma_data"), SoftMinSNRWeighting(snr_reference="unit"))
    with pytest.raises(ValueError, match=r"EDMWeighting.snr_reference='sigma_data' does not fit VPProcess"):
        _module(VPProcess(), EDMWeighting(snr_reference="sigma_data"), prediction="eps")
    # Explicit values that agree with the process are accepted.
    _module(EDMProcess(sigma_data=0.5, snr_reference="sigma_data"),
            EDMWeighting(sigma_data=0.5, snr_reference="sigma_data"))


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match=r"EDMWeighting.snr_reference='data' is not supported"):
        EDMWeighting(snr_reference="data")
    with pytest.raises(ValueError, match=r"SoftMinSNRWeighting.sigma_data=-1.0 must be > 0"):
        SoftMinSNRWeighting(sigma_data=-1.0)
    snr = EDMProcess(snr_reference="sigma_data").snr(SIGMA)
    with pytest.raises(ValueError, match=r"prediction='eps'"):
        EDMWeighting(snr_reference="sigma_data")(snr, "eps")
