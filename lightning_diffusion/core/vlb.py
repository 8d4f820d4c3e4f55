"""The per-timestep term of the DDPM variational bound, in bits per dimension (docs/algorithms.md 4).

For a VP chain (library indexing, ``t = 0..T-1``, ``abar_{-1} := 1``) the bound's term at ``t >= 1`` is
``L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))``. The true posterior is Gaussian with mean
``mu~ = c0_t x0 + ct_t x_t`` and variance ``beta~_t``::

    c0_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t),   ct_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
    beta~_t = (1 - abar_{t-1}) beta_t / (1 - abar_t).

**Choice**: the model's reverse step uses the same fixed variance ``beta~_t`` and the mean
``mu_theta = c0_t x0_hat + ct_t x_t`` built from the network's x0 estimate. Equal variances reduce
the KL to ``||mu~ - mu_theta||^2 / (2 beta~_t) = c0_t^2 / (2 beta~_t) ||x0_hat - x0||^2``, and

    c0_t^2 / (2 beta~_t) = abar_{t-1} beta_t / (2 (1 - abar_{t-1}) (1 - abar_t)) = (SNR(t-1) - SNR(t)) / 2

nats per unit of summed squared error. Per dimension and in bits: ``L_t = w_t mean_d (x0_hat - x0)^2``
with ``w_t = (SNR(t-1) - SNR(t)) / (2 ln 2)``.

**Choice** at ``t = 0`` (the paper's decoder, a discretized Gaussian log-likelihood): the same
formula with ``beta~_0 := beta~_1`` (improved-diffusion's clipped posterior variance); there
``c0_0 = 1``, so ``w_0 = 1 / (2 ln 2 beta~_1)``: a continuous Gaussian NLL of x0 around x0_hat
without its constant (a constant cancels in any before/after decrease) and without the bins.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .noise import NoiseProcess, VPProcess

__all__ = ["posterior_variance", "vlb_weights"]


def _abar_prev(process: VPProcess) -> Tensor:
    """``abar_{t-1}`` for t = 0..T-1 in float64, with ``abar_{-1} := 1``."""
    abar = process.alphas_cumprod
    return torch.cat([abar.new_ones(1), abar[:-1]])


def posterior_variance(process: VPProcess) -> Tensor:
    """``beta~_t = (1 - abar_{t-1}) beta_t / (1 - abar_t)`` in float64 (``beta~_0 = 0``)."""
    abar = process.alphas_cumprod
    return (1 - _abar_prev(process)) * process.betas / (1 - abar)


def vlb_weights(process: NoiseProcess) -> Tensor:
    """``w_t`` (float64, [T]) with ``L_t`` in bits/dim ``= w_t * mean_d (x0_hat - x0)^2`` (module docstring)."""
    if not isinstance(process, VPProcess):
        raise ValueError(f"The variational-bound term is defined for the discrete VPProcess; got "
                         f"{type(process).__name__}.")
    abar, prev = process.alphas_cumprod, _abar_prev(process)
    nats = prev * process.betas / (2 * (1 - prev).clamp_min(1e-300) * (1 - abar))  # (SNR(t-1) - SNR(t)) / 2
    nats[0] = 1.0 / (2 * posterior_variance(process)[1])  # t = 0 stand-in: beta~_0 := beta~_1, c0_0 = 1
    return nats / math.log(2.0)
