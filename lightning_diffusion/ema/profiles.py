"""Power-function EMA profiles and post-hoc coefficients (docs/algorithms.md 3.4, 3.5).

Pure math, no Lightning: a profile is (t, gamma), the density ``(g+1) tau^g / t^(g+1)`` on [0, t].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["MAX_SIGMA_REL", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "power_function_beta",
           "profile_inner_product", "solve_posthoc_coefficients"]

MAX_SIGMA_REL = 12 ** -0.5  # gamma -> 0


def check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> float:
    """Raise the one-sentence error of docs/architecture.md unless ``0 < sigma_rel < 12^-0.5``."""
    value = float(sigma_rel)
    if not 0.0 < value < MAX_SIGMA_REL:
        raise ValueError(f"{name}={sigma_rel} is out of range: it must satisfy 0 < {name} < 12^-0.5 ~ 0.2887.")
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3))), docs/algorithms.md 3.4."""
    g = float(gamma)
    if g <= 0:
        raise ValueError(f"gamma={gamma} must be > 0.")
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0, docs/algorithms.md 3.4."""
    s2 = check_sigma_rel(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-6].real.max())


def power_function_beta(sigma_rel: float, t: float, dt: float) -> float:
    """EMA decay beta = (1 - dt/t)^(gamma+1); t = images after the step, dt = since the last update."""
    if not 0 < dt <= t:
        raise ValueError(f"power_function_beta needs 0 < dt <= t, got t={t}, dt={dt}.")
    return float((1.0 - dt / t) ** (sigma_rel_to_gamma(sigma_rel) + 1.0))


def profile_inner_product(t_a: Tensor, g_a: Tensor, t_b: Tensor, g_b: Tensor) -> Tensor:
    """<a,b> = (g_a+1)(g_b+1)(t_a/t_b)^e / ((g_a+g_b+1) max(t_a,t_b)), e = g_b if t_a<t_b else -g_a."""
    exponent = torch.where(t_a < t_b, g_b, -g_a)
    numerator = (g_a + 1) * (g_b + 1) * (t_a / t_b) ** exponent
    return numerator / ((g_a + g_b + 1) * torch.maximum(t_a, t_b))


def solve_posthoc_coefficients(
    in_times: Sequence[float], in_sigma_rels: Sequence[float], out_time: float, out_sigma_rels: Sequence[float]
) -> Tensor:
    """Weights X [len(in), len(out)] (float64, columns sum to 1) with theta_out = X^T theta_in, 3.5."""
    if len(in_times) != len(in_sigma_rels) or not len(in_times):
        raise ValueError(f"need one sigma_rel per input time, got {len(in_times)} times and "
                         f"{len(in_sigma_rels)} sigma_rels (at least one).")
    scale = float(max(max(in_times), out_time))  # <a,b> scales as 1/t: X is invariant, A better conditioned
    t_in = torch.as_tensor(in_times, dtype=torch.float64) / scale
    g_in = torch.tensor([sigma_rel_to_gamma(s) for s in in_sigma_rels], dtype=torch.float64)
    g_out = torch.tensor([sigma_rel_to_gamma(s) for s in out_sigma_rels], dtype=torch.float64)
    t_out = torch.full_like(g_out, float(out_time) / scale)
    if (t_in <= 0).any() or (t_out <= 0).any():
        raise ValueError("post-hoc reconstruction needs snapshot and target times > 0 (in images seen).")
    A = profile_inner_product(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    B = profile_inner_product(t_in[:, None], g_in[:, None], t_out[None, :], g_out[None, :])
    X = torch.linalg.lstsq(A, B, driver="gelsd").solution  # SVD-based: robust when A is near-singular
    return X / X.sum(dim=0, keepdim=True)
