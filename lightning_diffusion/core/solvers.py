"""Generation solvers: EDM Heun (with optional churn), Euler and DDIM (docs/algorithms.md 0).

Every solver has the same signature, ``solver(denoiser, x, sigmas, generator=None, **options)``,
and works in the scaled (VE) space of Karras et al. (2022): ``x = x_t / a_t`` with noise level
``sigma = s_t / a_t``. ``denoiser(x, sigma) -> x0 estimate`` takes a batch and a per-sample sigma
[B]. ``sigmas`` is a descending 1-D grid ending in 0; ``x`` starts as ``sigmas[0] * N(0, I)``.
In this space deterministic DDIM is exactly the Euler step of the probability-flow ODE
``dx/dsigma = (x - D(x; sigma)) / sigma``; DDIM's ``eta`` adds the ancestral noise of DDPM.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["karras_sigmas", "euler", "heun", "ddim", "SOLVERS", "flow_times", "flow_euler", "flow_heun",
           "FLOW_SOLVERS"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM time steps (Karras et al. 2022, eq. 5) in float64, with a final 0 appended."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1.")
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / max(num_steps - 1, 1)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _batch_sigma(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """First-order probability-flow ODE steps (deterministic)."""
    return heun(denoiser, x, sigmas, generator=generator, second_order=False)


@torch.no_grad()
def heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    second_order: bool = True,
) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2); ``churn=0`` is deterministic Heun."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + (sigma_hat**2 - sigma**2).sqrt().to(x.dtype) * s_noise * z
        d = (x - denoiser(x, _batch_sigma(sigma_hat, x))) / sigma_hat.to(x.dtype)
        x_next = x + (sigma_next - sigma_hat).to(x.dtype) * d
        if second_order and float(sigma_next) > 0:
            d_next = (x_next - denoiser(x_next, _batch_sigma(sigma_next, x))) / sigma_next.to(x.dtype)
            x_next = x + (sigma_next - sigma_hat).to(x.dtype) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in VE form; ``eta=1`` is DDPM's ancestral sampler.

    ``sigma_up = eta * sqrt(s'^2 (s^2 - s'^2) / s^2)``, ``sigma_down = sqrt(s'^2 - sigma_up^2)``:
    the VE rewrite of DDIM's ``sigma_t(eta)`` divided by ``a_{t-1}``.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, _batch_sigma(sigma, x))
        up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp_min(0).sqrt()
        down = (sigma_next**2 - up**2).clamp_min(0).sqrt()
        x = x0 + (down / sigma).to(x.dtype) * (x - x0)
        if float(up) > 0:
            x = x + up.to(x.dtype) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


SOLVERS: dict[str, Callable[..., Tensor]] = {"heun": heun, "euler": euler, "ddim": ddim}


# ----------------------------------------------------------------------------- rectified flow
# The flow ODE dx/dt = v(x, t) runs from t = 1 (pure noise) to t = 0 (data), in t itself
# (docs/algorithms.md 6). ``velocity(x, t) -> v`` takes a batch and a per-sample t [B].
Velocity = Callable[[Tensor, Tensor], Tensor]


def flow_times(num_steps: int, shift: float = 1.0) -> Tensor:
    """Descending float64 grid from 1 to 0 with ``num_steps`` intervals, uniform in t before the shift.

    ``shift`` moves the grid towards noise as SD3's resolution shift does, ``t' = s t / (1 + (s - 1) t)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1.")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def flow_euler(velocity: Velocity, x: Tensor, times: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """First-order steps ``x <- x + (t_next - t) v(x, t)`` (equal to deterministic DDIM on this path)."""
    return flow_heun(velocity, x, times, generator=generator, second_order=False)


@torch.no_grad()
def flow_heun(velocity: Velocity, x: Tensor, times: Tensor, generator: torch.Generator | None = None,
              second_order: bool = True) -> Tensor:
    """Heun's method in t: the Euler step corrected by the velocity at its end (skipped at t = 0)."""
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        dt = (t_next - t).to(x.dtype)
        v = velocity(x, _batch_sigma(t, x))
        x_next = x + dt * v
        if second_order and float(t_next) > 0:
            x_next = x + dt * (v + velocity(x_next, _batch_sigma(t_next, x))) / 2
        x = x_next
    return x


FLOW_SOLVERS: dict[str, Callable[..., Tensor]] = {"heun": flow_heun, "euler": flow_euler}
