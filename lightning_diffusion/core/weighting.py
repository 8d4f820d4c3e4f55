"""Per-sample loss weightings, Min-SNR-gamma among them (ALGORITHMS.md 1).

Every weighting shares one signature, ``weighting(snr, prediction) -> weight`` (float32, [B]),
so YAML can swap them with ``class_path``. Each is defined by its weight in **x0 space**,
``w_x0(SNR)``, and converted to the prediction's space with closed forms that never divide by
an SNR that can be 0 (zero terminal SNR):

    eps-space weight = w_x0 / SNR        since x0_hat - x0 = -(s/a) (eps_hat - eps), (s/a)^2 = 1/SNR
    v-space weight   = w_x0 / (SNR + 1)  since x0_hat - x0 = -s (v_hat - v),         s^2 = 1/(SNR+1)

``ConstantWeighting`` is the exception: weight 1 in whatever space the network predicts (the
DDPM "simple" loss for eps). SNR and weights are computed in fp32 outside autocast.
For sigma (EDM) processes, weightings that name ``sigma_data`` read ``sigma^2 = 1/SNR``, i.e.
they assume the process's default ``snr_reference="unit"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LossWeighting",
    "min_snr_weight",
    "ConstantWeighting",
    "SNRWeighting",
    "MinSNRWeighting",
    "MaxSNRWeighting",
    "TruncatedSNRWeighting",
    "SoftMinSNRWeighting",
    "EDMWeighting",
]

# Where a weighting is unbounded at SNR = 0 in eps space (max-SNR, EDM lambda), the SNR is
# floored here so the weight stays finite; only zero-terminal-SNR schedules reach it (the
# cosine schedule's last step has SNR ~2.4e-9 at T=1000, ~1.5e-10 at T=4000: keep it below).
_SNR_FLOOR = 1e-12


def _check_prediction(prediction: str) -> None:
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"prediction={prediction!r} is not supported; use 'eps', 'x0' or 'v'.")


def _from_x0(w_x0: Tensor, snr: Tensor, prediction: str) -> Tensor:
    """Convert an x0-space weight to the prediction's space (generic form, SNR floored for eps)."""
    _check_prediction(prediction)
    if prediction == "x0":
        return w_x0
    if prediction == "eps":
        return w_x0 / snr.clamp_min(_SNR_FLOOR)
    return w_x0 / (snr + 1)


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023, eq. 10-12): x0-space ``min(SNR, gamma)``.

    eps: ``min(1, gamma / SNR)`` (1 at SNR == 0); v: ``min(SNR, gamma) / (SNR + 1)``.
    """
    if not gamma > 0:
        raise ValueError(f"MinSNRWeighting.gamma={gamma} must be > 0.")
    _check_prediction(prediction)
    snr = snr.float()
    if prediction == "x0":
        return snr.clamp_max(gamma)
    if prediction == "eps":
        # min(SNR, g) / SNR == g / max(SNR, g): no division by an SNR that may be 0.
        return gamma / snr.clamp_min(gamma)
    return snr.clamp_max(gamma) / (snr + 1)


class LossWeighting:
    """Protocol: ``__call__(snr [B] float32, prediction) -> weight [B] float32``."""

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantWeighting(LossWeighting):
    """Weight 1 in the prediction's own space (the DDPM "simple" eps loss)."""

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        _check_prediction(prediction)
        return torch.ones_like(snr, dtype=torch.float32)


class SNRWeighting(LossWeighting):
    """x0-space weight ``SNR`` (equals the constant eps-space loss)."""

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        snr = snr.float()
        if prediction == "eps":
            return torch.ones_like(snr)
        return _from_x0(snr, snr, prediction)


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma: clamp the x0-space weight at ``min(SNR, gamma)`` (ALGORITHMS.md 1).

    Example::

        weighting = MinSNRWeighting(gamma=5.0)
        w = weighting(process.snr(t), "eps")
    """

    def __init__(self, gamma: float = 5.0) -> None:
        if not gamma > 0:
            raise ValueError(f"MinSNRWeighting.gamma={gamma} must be > 0.")
        self.gamma = float(gamma)

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        return min_snr_weight(snr, self.gamma, prediction)


class MaxSNRWeighting(LossWeighting):
    """x0-space weight ``max(SNR, k)`` (Max-SNR-k of the Min-SNR paper's comparison)."""

    def __init__(self, k: float = 1.0) -> None:
        if not k > 0:
            raise ValueError(f"MaxSNRWeighting.k={k} must be > 0.")
        self.k = float(k)

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        snr = snr.float()
        return _from_x0(snr.clamp_min(self.k), snr, prediction)


class TruncatedSNRWeighting(MaxSNRWeighting):
    """Truncated SNR ``max(SNR, 1)`` in x0 space (Salimans & Ho 2022)."""

    def __init__(self) -> None:
        super().__init__(k=1.0)


class SoftMinSNRWeighting(LossWeighting):
    """Soft-min-SNR: x0-space ``1 / (sigma^2 + sigma_data^2)`` with ``sigma^2 = 1/SNR``.

    Closed forms: x0 ``SNR / (1 + sd^2 SNR)``, eps ``1 / (1 + sd^2 SNR)``.
    """

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"SoftMinSNRWeighting.sigma_data={sigma_data} must be > 0.")
        self.sigma_data = float(sigma_data)

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        _check_prediction(prediction)
        snr = snr.float()
        eps_w = 1.0 / (1.0 + self.sigma_data**2 * snr)
        if prediction == "eps":
            return eps_w
        w_x0 = snr * eps_w
        return w_x0 if prediction == "x0" else w_x0 / (snr + 1)


class EDMWeighting(LossWeighting):
    """EDM ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = SNR + 1/sd^2`` in x0 space.

    For the EDM-preconditioned denoiser this makes the loss on the raw network output ``F``
    unweighted (``lambda = 1 / c_out^2``).
    """

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"EDMWeighting.sigma_data={sigma_data} must be > 0.")
        self.sigma_data = float(sigma_data)

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        snr = snr.float()
        return _from_x0(snr + 1.0 / self.sigma_data**2, snr, prediction)
