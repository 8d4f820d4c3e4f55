"""The default training density of a process, and the check that a density fits its process."""

from __future__ import annotations

from ..core.noise import EDMProcess, NoiseProcess, VPProcess
from .base import TimestepDistribution
from .lognormal import LogNormalSigma
from .uniform import UniformTimesteps

__all__ = ["default_timesteps", "check_timesteps"]


def default_timesteps(process: NoiseProcess) -> TimestepDistribution:
    """Uniform t for VP processes, EDM's log-normal sigma for EDM (docs/algorithms.md 0.3)."""
    if isinstance(process, VPProcess):
        return UniformTimesteps(process.num_timesteps)
    assert isinstance(process, EDMProcess)
    return LogNormalSigma(process.P_mean, process.P_std)


def check_timesteps(timesteps: TimestepDistribution, process: NoiseProcess) -> None:
    """One sentence if ``timesteps`` draws another kind of level (or another T) than ``process`` takes."""
    if timesteps.discrete != process.discrete:
        kind = "discrete timesteps" if process.discrete else "continuous sigma"
        raise ValueError(
            f"timesteps={type(timesteps).__name__} does not fit {type(process).__name__}, which needs {kind}."
        )
    num = getattr(timesteps, "num_timesteps", None)
    if process.discrete and num is not None and num != process.num_timesteps:
        raise ValueError(
            f"timesteps.num_timesteps={num} must equal process.num_timesteps={process.num_timesteps}."
        )
