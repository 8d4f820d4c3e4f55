"""Magnitude-preserving (MP) primitives of EDM2 (Karras et al. 2024), docs/algorithms.md 3.1.

Rule: on inputs of unit RMS (per sample, over the non-batch dims), every primitive returns
outputs of unit RMS in expectation, so activations neither grow nor shrink through the
network and no normalization layer or bias is needed. Weights live in ``MPConv``: the stored
weight is kept at unit RMS per output channel by ``normalize_weights_`` (forced weight
normalization, called once after each optimizer step), and the forward pass normalizes it again
differentiably, so the output does not depend on the stored weight's scale.

All helpers are pure torch, have no data-dependent Python control flow and compile with
``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.shards import local

__all__ = ["normalize", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv"]


def normalize(x: Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-4) -> Tensor:
    """``x / (eps + ||x|| / sqrt(n))`` over ``dim`` (default: all but dim 0), n = reduced elements (3.1).

    Unit RMS over the reduced dims: dim=None on a weight [out, in, k, k] normalizes each output
    channel; dim=1 on activations [B, C, H, W] is pixel norm. The norm is taken in fp32.
    """
    if dim is None:
        dim = tuple(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """``silu(x) / 0.596``: 0.596 = sqrt(E[silu(z)^2]) for z ~ N(0, 1), so unit RMS in, unit out (3.1)."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """``((1-t) a + t b) / sqrt((1-t)^2 + t^2)``: blend of two uncorrelated unit signals at unit RMS (3.1)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenate along ``dim`` so that a and b contribute in proportion (1-t) : t at unit RMS (3.1).

    ``a`` is scaled by ``C (1-t)/sqrt(Na)``, ``b`` by ``C t/sqrt(Nb)``, ``C = sqrt((Na+Nb)/((1-t)^2+t^2))``.
    """
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPFourier(nn.Module):
    """Random Fourier features of a scalar: ``cos(x freqs + phases) * sqrt(2)``, unit RMS, fp32 (3.1).

    ``freqs = 2 pi randn(C)``, ``phases = 2 pi rand(C)`` are buffers, so checkpoints carry them
    (DDP broadcasts rank 0's at wrap time).

    Example::

        emb = MPFourier(128)(torch.randn(8))  # [8, 128]
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"MPFourier.num_channels={num_channels} must be >= 1.")
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = x.reshape(-1).float()[:, None] * self.freqs.float()[None, :] + self.phases.float()[None, :]
        return (torch.cos(y) * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Bias-free conv (``kernel=(k, k)``) or linear layer (``kernel=()``) with normalized weights (3.1).

    Forward uses ``normalize(w) * gain / sqrt(fan_in)``: each output channel's weight has unit
    norm, so a unit-RMS input with uncorrelated entries gives a unit-RMS output times ``gain``.
    The stored weight starts at unit RMS per output channel and ``normalize_weights_`` restores
    that after every optimizer step (forced weight normalization, **choice**: outside forward so
    DDP, gradient accumulation and ``torch.compile`` never see an in-place write in the graph).

    Example::

        conv = MPConv(16, 32, kernel=(3, 3))
        y = conv(torch.randn(2, 16, 8, 8))            # unit RMS out
        y0 = conv(torch.randn(2, 16, 8, 8), gain=0.0)  # a learned gain that starts at 0
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"MPConv channels ({in_channels} -> {out_channels}) must both be >= 1.")
        if len(kernel) not in (0, 2) or any(k < 1 or k % 2 == 0 for k in kernel):
            raise ValueError(f"MPConv.kernel={tuple(kernel)} must be () (linear) or (k, k) with odd k >= 1.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(normalize(torch.randn(out_channels, in_channels, *kernel)))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = normalize(self.weight.float())  # differentiable: output invariant to the stored scale
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """Forced weight normalization: reset the stored weight to unit RMS per output channel.

        Under FSDP2 each rank normalizes its own rows (docs/sharding.md): an output channel is one row
        of dim 0, which FSDP never splits, so the local result is the whole layer's.
        """
        weight = local(self.weight)
        if weight.numel():  # FSDP2 may give a rank no rows of a small layer
            weight.copy_(normalize(weight.float()).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={tuple(self.weight.shape[2:])}"


@torch.no_grad()
def normalize_mp_weights_(*roots: nn.Module | None) -> None:
    """Call ``normalize_weights_()`` of every layer below ``roots`` that has one (MPConv, docs/algorithms.md 3.1)."""
    for root in roots:
        for layer in root.modules() if root is not None else ():
            if hasattr(layer, "normalize_weights_"):
                layer.normalize_weights_()
