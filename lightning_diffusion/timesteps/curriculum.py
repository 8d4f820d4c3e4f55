"""Easy-to-hard timestep curriculum: noise-level clusters, stage supports and pacers (docs/algorithms.md 5).

The noise range is cut into ``N`` clusters; cluster ``N`` holds the most noise (easiest), cluster
1 the least (hardest). Stage ``n`` trains on the union of the ``n`` easiest clusters, which in the
base density's CDF coordinate ``u`` (increasing with noise) is ``[1 - n/N, 1]`` for equal-mass
clusters: any restrictable distribution draws it exactly by inverse CDF (``restrict``), never by
rejection. A pacer decides when to move to the next stage. Pure torch and Python: no Lightning.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..core.noise import NoiseProcess

__all__ = [
    "CLUSTERINGS", "FixedPacer", "PatiencePacer", "cluster_bounds", "discrete_bounds",
    "log_snr_discrete_bounds", "log_snr_sigma_bounds", "quantile_bounds", "stage_support",
]

CLUSTERINGS = ("quantile", "log_snr")


# ---------------------------------------------------------------------- clusters (docs/algorithms.md 5)
def discrete_bounds(num_timesteps: int, num_clusters: int) -> list[int]:
    """Equal-width integer edges ``b_k = floor(k T / N)``: cluster ``k`` is ``t in [b_{k-1}, b_k)``.

    Every ``t`` in ``0..T-1`` lies in exactly one cluster; no cluster is empty when ``N <= T``.
    """
    _check_count(num_clusters, num_timesteps)
    return [k * num_timesteps // num_clusters for k in range(num_clusters + 1)]


def log_snr_discrete_bounds(log_snr: Tensor, num_clusters: int) -> list[int]:
    """Integer edges at equal log-SNR spacing for a decreasing ``log_snr[t]`` (``-inf`` allowed at the end).

    Edge ``k`` is the first ``t`` whose log-SNR is at or below ``hi - k (hi - lo) / N``, where
    ``hi``/``lo`` are the first and the last finite log-SNR. Steep schedule ends can leave an
    interval with no integer ``t``: edges are then pushed apart so every cluster keeps >= 1 step.
    """
    num_timesteps = log_snr.numel()
    _check_count(num_clusters, num_timesteps)
    values = log_snr.double()
    finite = values[torch.isfinite(values)]
    hi, lo = finite[0].item(), finite[-1].item()
    edges = [0]
    for k in range(1, num_clusters):
        level = hi - k * (hi - lo) / num_clusters
        edges.append(int((values > level).sum().item()))  # log_snr decreases: count = first t below
    edges.append(num_timesteps)
    for k in range(1, num_clusters):  # forward pass: at least one step after the previous edge
        edges[k] = max(edges[k], edges[k - 1] + 1)
    for k in range(num_clusters - 1, 0, -1):  # backward pass: room for the clusters above
        edges[k] = min(edges[k], edges[k + 1] - 1)
    return edges


def quantile_bounds(num_clusters: int) -> list[float]:
    """Equal-probability edges of the base density in its CDF coordinate: ``u_k = k / N``.

    For EDM's log-normal these are ``sigma_k = exp(P_mean + P_std Phi^-1(k / N))``.
    """
    _check_count(num_clusters, None)
    return [k / num_clusters for k in range(num_clusters + 1)]


def log_snr_sigma_bounds(
    cdf: Callable[[Tensor], Tensor], sigma_min: float, sigma_max: float, num_clusters: int
) -> list[float]:
    """Edges equally spaced in log-SNR on ``[sigma_min, sigma_max]``, as base-CDF coordinates ``u``.

    ``log SNR = log(ref) - 2 log(sigma)``, so equal log-SNR spacing is equal ``log sigma`` spacing;
    the outer clusters extend to ``u = 0`` and ``u = 1`` so the partition covers the whole density.
    """
    _check_count(num_clusters, None)
    fractions = torch.arange(1, num_clusters, dtype=torch.float64) / num_clusters
    sigma = torch.exp(math.log(sigma_min) + fractions * (math.log(sigma_max) - math.log(sigma_min)))
    inner = cdf(sigma).double().tolist()
    edges = [0.0, *inner, 1.0]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(
            f"TimestepCurriculum.clustering='log_snr' leaves clusters with no probability under this density "
            f"for num_clusters={num_clusters}; use fewer clusters or clustering='quantile'."
        )
    return edges


def cluster_bounds(
    process: NoiseProcess, num_clusters: int, clustering: str = "quantile", base: Any = None,
) -> tuple[list[float], list[float]]:
    """The partition as ``(u_bounds, level_bounds)``, each ``N + 1`` increasing edges.

    ``u_bounds`` are base-CDF coordinates (``u_0 = 0``, ``u_N = 1``); ``level_bounds`` are the same
    edges as timesteps (discrete: integers ``b_k`` with ``u_k = b_k / T`` exactly) or as sigma or
    flow time (continuous: ``base.icdf(u_k)``, ends 0 and inf; descriptive only). ``base`` is the base
    density (an ``InverseCDFDistribution``); sigma processes need it.
    """
    if clustering not in CLUSTERINGS:
        raise ValueError(f"TimestepCurriculum.clustering={clustering!r} is not supported; use one of {CLUSTERINGS}.")
    if process.discrete:
        T = int(process.num_timesteps)
        if clustering == "quantile":
            edges = discrete_bounds(T, num_clusters)
        else:
            edges = log_snr_discrete_bounds(process.snr(torch.arange(T)).double().log(), num_clusters)
        return [b / T for b in edges], [float(b) for b in edges]
    if base is None:
        raise ValueError("cluster_bounds needs the base density (base=) for a sigma process.")
    if clustering == "quantile":
        u = quantile_bounds(num_clusters)
    else:
        # Edges in VE sigma, mapped to the process's level (EDM: sigma; flow: t = sigma / (1 + sigma)).
        cdf = lambda sigma: base.cdf(process.level_from_sigma(sigma))  # noqa: E731
        u = log_snr_sigma_bounds(cdf, process.sigma_min, process.sigma_max, num_clusters)
    inner = base.icdf(torch.tensor(u[1:-1], dtype=torch.float64)).double().tolist()
    return u, [0.0, *inner, math.inf]


def stage_support(u_bounds: list[float], stage: int) -> tuple[float, float]:
    """Stage ``n``'s CDF interval: the ``n`` easiest (noisiest) clusters, ``[u_{N-n}, 1]``."""
    num_clusters = len(u_bounds) - 1
    if not 1 <= stage <= num_clusters:
        raise ValueError(f"stage={stage} must be in 1..{num_clusters}.")
    return float(u_bounds[num_clusters - stage]), 1.0


def _check_count(num_clusters: int, num_timesteps: int | None) -> None:
    if num_clusters < 1:
        raise ValueError(f"TimestepCurriculum.num_clusters={num_clusters} must be >= 1.")
    if num_timesteps is not None and num_clusters > num_timesteps:
        raise ValueError(
            f"TimestepCurriculum.num_clusters={num_clusters} must be <= the process's {num_timesteps} timesteps."
        )


# ---------------------------------------------------------------------- pacers (docs/algorithms.md 5)
class _Pacer:
    """Stage counter shared by the pacers: stages ``1..num_stages``, never beyond."""

    def __init__(self, num_stages: int) -> None:
        if num_stages < 1:
            raise ValueError(f"TimestepCurriculum.num_clusters={num_stages} must be >= 1.")
        self.num_stages = num_stages
        self.stage = 1
        self.steps_in_stage = 0

    @property
    def finished(self) -> bool:
        """In the last stage: all clusters, ordinary training; the pacer has nothing left to decide."""
        return self.stage >= self.num_stages

    def _advance(self) -> None:
        self.stage += 1
        self.steps_in_stage = 0

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "steps_in_stage": self.steps_in_stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage, self.steps_in_stage = int(state["stage"]), int(state["steps_in_stage"])


class FixedPacer(_Pacer):
    """Equal steps per stage: advance after every ``steps_per_stage`` steps (losses are ignored).

    Example::

        pacer = FixedPacer(num_stages=20, steps_per_stage=500)
        switched = pacer.step()
    """

    def __init__(self, num_stages: int, steps_per_stage: int) -> None:
        super().__init__(num_stages)
        if steps_per_stage < 1:
            raise ValueError(f"TimestepCurriculum.steps_per_stage={steps_per_stage} must be >= 1 with pacing='fixed'.")
        self.steps_per_stage = steps_per_stage

    def step(self, loss: float | None = None) -> bool:
        """Count one optimizer step; True when it ends the stage (the caller applies the next one)."""
        if self.finished:
            return False
        self.steps_in_stage += 1
        if self.steps_in_stage >= self.steps_per_stage:
            self._advance()
            return True
        return False


class PatiencePacer(_Pacer):
    """Advance when the smoothed loss has not improved on the stage's best for more than ``patience`` steps.

    ``smoothed = smoothing * smoothed + (1 - smoothing) * loss``, started at the stage's first loss
    (``smoothing = 0``: the raw loss). A step improves when ``smoothed < best - min_delta * |best|``
    (``delta_mode="relative"``) or ``smoothed < best - min_delta`` (``"absolute"``); otherwise it
    counts toward ``wait``, and ``wait > patience`` advances. A constant loss therefore advances
    every ``patience + 2`` steps (the first sets ``best``). ``max_steps_per_stage`` is a hard cap.
    Each switch resets best, wait and the smoothed loss: the next stage's loss is a new quantity.

    Example::

        pacer = PatiencePacer(num_stages=20, patience=200, smoothing=0.98)
        switched = pacer.step(loss)
    """

    def __init__(self, num_stages: int, patience: int, smoothing: float = 0.0, min_delta: float = 0.0,
                 delta_mode: str = "relative", max_steps_per_stage: int | None = None) -> None:
        super().__init__(num_stages)
        if patience < 1:
            raise ValueError(f"TimestepCurriculum.patience={patience} must be >= 1.")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"TimestepCurriculum.smoothing={smoothing} must be in [0, 1).")
        if min_delta < 0:
            raise ValueError(f"TimestepCurriculum.min_delta={min_delta} must be >= 0.")
        if delta_mode not in ("relative", "absolute"):
            raise ValueError(f"TimestepCurriculum.delta_mode={delta_mode!r} must be 'relative' or 'absolute'.")
        if max_steps_per_stage is not None and max_steps_per_stage < 1:
            raise ValueError(f"TimestepCurriculum.max_steps_per_stage={max_steps_per_stage} must be >= 1 or None.")
        self.patience, self.smoothing, self.min_delta = patience, smoothing, min_delta
        self.delta_mode, self.max_steps_per_stage = delta_mode, max_steps_per_stage
        self._reset()
        self.last_smoothed = math.nan  # the latest smoothed loss, kept across switches (for logs)

    def _reset(self) -> None:
        self.best, self.wait, self.smoothed = math.inf, 0, math.nan

    def _improves(self, value: float) -> bool:
        if math.isinf(self.best):
            return True
        margin = self.min_delta * abs(self.best) if self.delta_mode == "relative" else self.min_delta
        return value < self.best - margin

    def step(self, loss: float) -> bool:
        """Feed one optimizer step's (all-reduced) loss; True when it ends the stage."""
        if self.finished:
            return False
        self.steps_in_stage += 1
        first = self.steps_in_stage == 1
        self.smoothed = loss if first else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        if self._improves(self.smoothed):
            self.best, self.wait = self.smoothed, 0
        else:
            self.wait += 1
        self.last_smoothed = self.smoothed
        capped = self.max_steps_per_stage is not None and self.steps_in_stage >= self.max_steps_per_stage
        if self.wait > self.patience or capped:
            self._advance()
            self._reset()
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best": self.best, "wait": self.wait, "smoothed": self.smoothed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best, self.wait, self.smoothed = float(state["best"]), int(state["wait"]), float(state["smoothed"])
