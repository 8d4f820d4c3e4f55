"""Per-sample loss weightings, Min-SNR-gamma among them (docs/algorithms.md 1).

Every weighting shares one signature, ``weighting(snr, prediction) -> weight`` (float32, [B]),
so YAML can swap them with ``class_path``. Each is defined by its weight in **x0 space**,
``w_x0(SNR)``, and converted to the prediction's space with closed forms that never divide by
an SNR that can be 0 (zero terminal SNR):

    eps-space weight = w_x0 / SNR        since x0_hat - x0 = -(s/a) (eps_hat - eps), (s/a)^2 = 1/SNR
    v-space weight   = w_x0 / (SNR + 1)  since x0_hat - x0 = -s (v_hat - v),         s^2 = 1/(SNR+1)
    flow-space weight = w_x0 t^2 = w_x0 / (1 + sqrt(SNR))^2
                                         since x0_hat - x0 = -t (u_hat - u) on the flow path,
                                         t = 1 / (1 + sqrt(SNR))   (docs/algorithms.md 6)

``ConstantWeighting`` is the exception: weight 1 in whatever space the network predicts (the
DDPM "simple" loss for eps). SNR and weights are computed in fp32 outside autocast.

Weightings written in sigma (``EDMWeighting``, ``SoftMinSNRWeighting``) read
``sigma^2 = ref / SNR``, ``ref`` = 1 for the ``"unit"`` SNR reference (and every VP process) or
``sigma_data^2`` for an ``EDMProcess(snr_reference="sigma_data")``. The module calls their
``bind(process)`` once at construction, so they learn the reference and ``sigma_data`` from it.
"""

from __future__ import annotations

import math
from typing import Any

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
    if prediction not in ("eps", "x0", "v", "flow"):
        raise ValueError(f"prediction={prediction!r} is not supported; use 'eps', 'x0', 'v' or 'flow'.")


def _flow_factor(snr: Tensor) -> Tensor:
    """``t^2 = 1 / (1 + sqrt(SNR))^2``: x0-space to flow-space weight (0 where SNR = inf, 1 at SNR = 0)."""
    return (1.0 + snr.sqrt()).reciprocal().square()


def _from_x0(w_x0: Tensor, snr: Tensor, prediction: str) -> Tensor:
    """Convert an x0-space weight to the prediction's space (generic form, SNR floored for eps)."""
    _check_prediction(prediction)
    if prediction == "x0":
        return w_x0
    if prediction == "eps":
        return w_x0 / snr.clamp_min(_SNR_FLOOR)
    if prediction == "flow":
        return w_x0 * _flow_factor(snr)
    return w_x0 / (snr + 1)


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023, eq. 10-12): x0-space ``min(SNR, gamma)``.

    eps: ``min(1, gamma / SNR)`` (1 at SNR == 0); v: ``min(SNR, gamma) / (SNR + 1)``; flow:
    ``min(SNR, gamma) t^2 = min((1 - t)^2, gamma t^2)`` (docs/algorithms.md 6).
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
    if prediction == "flow":
        return snr.clamp_max(gamma) * _flow_factor(snr)
    return snr.clamp_max(gamma) / (snr + 1)


class LossWeighting:
    """Protocol: ``__call__(snr [B] float32, prediction) -> weight [B] float32``.

    Optional ``bind(process)``: the module calls it once at construction (weightings written in
    sigma learn ``sigma_data`` and the SNR reference there).
    """

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
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
    """Min-SNR-gamma: clamp the x0-space weight at ``min(SNR, gamma)`` (docs/algorithms.md 1).

    At SNR == 0 (the last step of a zero-terminal-SNR schedule) the x0- and v-space weights are
    ``min(0, gamma) = 0``, which is also their limit as SNR -> 0: ``x_T`` is pure noise, so the
    x0 (or v = -x0) loss there only teaches the data mean, and the formula gives it no weight.
    That is the default. ``zero_snr_weight`` sets the x0-space weight used at SNR == 0 exactly
    (since ``a = 0, s = 1`` there, ``v = -x0`` and it is the v-space weight too). A value > 0
    trains the step that sampling starts from, where a zero-terminal-SNR v-model must output the
    mean image (Lin et al. 2024); diffusers-based scripts set 1 there, as a guard against their
    0/0 rather than from the formula. It is a jump, not a limit: the steps just before keep
    weights ~SNR. eps keeps its limit 1 (x0 cannot be read from eps where ``a = 0``).

    Example::

        weighting = MinSNRWeighting(gamma=5.0)
        w = weighting(process.snr(t), "eps")
    """

    def __init__(self, gamma: float = 5.0, zero_snr_weight: float = 0.0) -> None:
        if not gamma > 0:
            raise ValueError(f"MinSNRWeighting.gamma={gamma} must be > 0.")
        if not 0 <= zero_snr_weight < math.inf:
            raise ValueError(f"MinSNRWeighting.zero_snr_weight={zero_snr_weight} must be finite and >= 0.")
        self.gamma = float(gamma)
        self.zero_snr_weight = float(zero_snr_weight)

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        weight = min_snr_weight(snr, self.gamma, prediction)
        if self.zero_snr_weight == 0 or prediction == "eps":
            return weight
        return torch.where(snr == 0, torch.full_like(weight, self.zero_snr_weight), weight)


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


_SNR_REFERENCES = ("unit", "sigma_data")


class _SigmaWeighting(LossWeighting):
    """Base of weightings written in sigma: ``sigma^2 = ref / SNR`` with the process's SNR reference.

    ``sigma_data=None`` and ``snr_reference=None`` follow the process given to :meth:`bind`
    (unbound: 0.5 and ``"unit"``); explicit values that disagree with it are refused there.
    """

    def __init__(self, sigma_data: float | None, snr_reference: str | None) -> None:
        name = type(self).__name__
        if sigma_data is not None and not sigma_data > 0:
            raise ValueError(f"{name}.sigma_data={sigma_data} must be > 0.")
        if snr_reference is not None and snr_reference not in _SNR_REFERENCES:
            raise ValueError(f"{name}.snr_reference={snr_reference!r} is not supported; use 'unit' or 'sigma_data'.")
        self.sigma_data = None if sigma_data is None else float(sigma_data)
        self.snr_reference = snr_reference
        self._bound: tuple[float, str] | None = None  # (sigma_data, reference) learnt from the process

    def bind(self, process: Any) -> None:
        """Learn ``sigma_data`` and the SNR reference from the module's process (VP: unit reference)."""
        name, kind = type(self).__name__, type(process).__name__
        reference = getattr(process, "snr_reference", "unit")
        sigma_data = getattr(process, "sigma_data", None)
        if self.snr_reference == "sigma_data" and sigma_data is None:
            raise ValueError(f"{name}.snr_reference='sigma_data' does not fit {kind}, whose SNR is 1/sigma^2; "
                             f"leave snr_reference unset or use 'unit'.")
        if self.snr_reference is not None and self.snr_reference != reference:
            raise ValueError(f"{name}.snr_reference={self.snr_reference!r} does not match {kind}.snr_reference="
                             f"{reference!r}; leave it unset to follow the process.")
        if sigma_data is not None and self.sigma_data is not None and self.sigma_data != sigma_data:
            raise ValueError(f"{name}.sigma_data={self.sigma_data} does not match {kind}.sigma_data={sigma_data}; "
                             f"leave it unset to follow the process.")
        self._bound = (self.sigma_data or sigma_data or 0.5, reference)

    def _sd_and_ref(self, prediction: str) -> tuple[float, float]:
        """``(sigma_data, ref)`` with ``sigma^2 = ref / SNR``."""
        _check_prediction(prediction)
        sd, reference = self._bound or (self.sigma_data or 0.5, self.snr_reference or "unit")
        if reference == "unit":
            return sd, 1.0
        if prediction != "x0":
            raise ValueError(f"{type(self).__name__} with snr_reference='sigma_data' weights the EDM denoiser "
                             f"(x0 space); prediction={prediction!r} is not supported, use 'x0'.")
        return sd, sd**2


class SoftMinSNRWeighting(_SigmaWeighting):
    """Soft-min-SNR: x0-space ``1 / (sigma^2 + sigma_data^2)`` with ``sigma^2 = ref / SNR``.

    Closed forms: x0 ``SNR / (ref + sd^2 SNR)``; with the unit reference eps ``1 / (1 + sd^2 SNR)``.
    ``sigma_data`` and ``snr_reference`` default to the module's process (see :meth:`bind`).
    """

    def __init__(self, sigma_data: float | None = None, snr_reference: str | None = None) -> None:
        super().__init__(sigma_data, snr_reference)

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        sd, ref = self._sd_and_ref(prediction)
        snr = snr.float()
        inv = 1.0 / (ref + sd**2 * snr)  # 1/(sigma^2 + sd^2) = SNR * inv, finite at SNR == 0
        if prediction == "eps":
            return inv  # ref == 1 here: w_x0 / SNR without dividing by SNR
        return _from_x0(snr * inv, snr, prediction)


class EDMWeighting(_SigmaWeighting):
    """EDM ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = SNR / ref + 1/sd^2`` in x0 space.

    For the EDM-preconditioned denoiser this makes the loss on the raw network output ``F``
    unweighted (``lambda = 1 / c_out^2``). ``sigma_data`` and ``snr_reference`` default to the
    module's process (see :meth:`bind`).
    """

    def __init__(self, sigma_data: float | None = None, snr_reference: str | None = None) -> None:
        super().__init__(sigma_data, snr_reference)

    def __call__(self, snr: Tensor, prediction: str) -> Tensor:
        sd, ref = self._sd_and_ref(prediction)
        snr = snr.float()
        return _from_x0(snr / ref + 1.0 / sd**2, snr, prediction)
