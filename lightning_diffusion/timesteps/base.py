"""The training-time distribution over noise levels: the interface every sampler keeps.

A distribution draws a noise level per sample (an integer timestep ``t`` for discrete
processes, ``sigma`` for continuous ones) plus an importance weight, and may learn from the
per-sample losses it caused. Samplers that are a fixed density expose its inverse CDF, so a
curriculum can restrict any of them to a sub-range of noise by drawing ``u`` from a sub-interval
of ``[0, 1]`` (``u`` increases with noise, so ``[1 - f, 1]`` keeps the noisiest fraction ``f``).
Pure torch: no Lightning import.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["TimestepDistribution", "InverseCDFDistribution", "LearnedSampler", "check_restriction"]


class TimestepDistribution:
    """Protocol: ``sample`` -> (levels, importance weights); ``update`` learns from losses.

    ``chooses_levels`` is True for learned samplers that decide the training levels themselves
    (:class:`LearnedSampler`): two of them cannot be stacked, and callbacks check that flag, never
    each other's class.
    """

    discrete: bool = True
    chooses_levels: bool = False

    def sample(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        x0: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` levels on ``device`` and their importance weights (float32, mean 1 in expectation).

        ``x0`` and ``labels`` are the batch's clean data and class labels (``None`` if unconditional)
        as the module trains on them: a sampler that conditions on them (the adaptive one) reads them.
        """
        raise NotImplementedError

    def update(self, level: Tensor, per_sample_loss: Tensor) -> None:
        """Learn from the losses the drawn levels produced (no-op for fixed densities)."""

    def restrict(self, u_low: float, u_high: float) -> None:
        """Draw only levels whose base-density CDF lies in ``[u_low, u_high]``, renormalized.

        Every distribution a curriculum may wrap implements this (``u`` increases with noise).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be restricted to a noise range.")

    def state_dict(self) -> dict[str, Any]:
        """Plain state (tensors, numbers) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class InverseCDFDistribution(TimestepDistribution):
    """A fixed density sampled by inverse CDF on ``u ~ U(u_low, u_high)`` (full support: 0, 1).

    ``u_low``/``u_high`` let a curriculum truncate the density exactly, without rejection.
    """

    def __init__(self) -> None:
        self.u_low = 0.0
        self.u_high = 1.0

    def icdf(self, u: Tensor) -> Tensor:
        """Map ``u`` in [0, 1] (float64) to a noise level."""
        raise NotImplementedError

    def cdf(self, level: Tensor) -> Tensor:
        """The CDF of the full density at ``level`` (float64), the inverse of :meth:`icdf`."""
        raise NotImplementedError

    def restrict(self, u_low: float, u_high: float) -> None:
        """Sample only from the CDF range ``[u_low, u_high]`` (renormalized, exact)."""
        self.u_low, self.u_high = check_restriction(u_low, u_high)

    def sample(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        x0: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        u = self.u_low + (self.u_high - self.u_low) * u
        return self.icdf(u), torch.ones(batch_size, device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"u_low": self.u_low, "u_high": self.u_high}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.u_low, self.u_high = float(state["u_low"]), float(state["u_high"])


def check_restriction(u_low: float, u_high: float) -> tuple[float, float]:
    """``(u_low, u_high)`` as floats, or one sentence if they are no sub-interval of [0, 1]."""
    if not 0.0 <= u_low < u_high <= 1.0:
        raise ValueError(f"restrict needs 0 <= u_low < u_high <= 1; got ({u_low}, {u_high}).")
    return float(u_low), float(u_high)


class LearnedSampler(TimestepDistribution):
    """Base of the learned samplers that wrap a fixed density and choose the levels themselves.

    The wrapping conventions live here, once: ``base`` (an :class:`InverseCDFDistribution`),
    ``discrete`` and ``num_timesteps`` read from it, the curriculum's restriction ``[u_low, u_high]``
    of the base CDF (:meth:`restrict` calls :meth:`on_restrict`), and the record of the last draw
    (``last_level``, ``last_weight``) that the sampler callbacks compare with what the module
    trained on, so a module that draws its levels elsewhere is told.
    """

    chooses_levels = True

    def __init__(self, base: InverseCDFDistribution) -> None:
        if not isinstance(base, InverseCDFDistribution):
            raise ValueError(f"{type(self).__name__} needs a base density with an inverse CDF (UniformTimesteps, "
                             f"LogNormalSigma, ...); got {type(base).__name__}.")
        self.base, self.discrete = base, base.discrete
        self.level_kind = getattr(base, "level_kind", None)
        if hasattr(base, "num_timesteps"):
            self.num_timesteps = base.num_timesteps
        self.u_low, self.u_high = base.u_low, base.u_high
        self.last_level: Tensor | None = None
        self.last_weight: Tensor | None = None

    def record(self, level: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the draw (for the callbacks' consistency check) and return it."""
        self.last_level, self.last_weight = level, weight
        return level, weight

    def restrict(self, u_low: float, u_high: float) -> None:
        self.u_low, self.u_high = check_restriction(u_low, u_high)
        self.on_restrict()

    def on_restrict(self) -> None:
        """Recompute what depends on the restriction (nothing by default)."""
