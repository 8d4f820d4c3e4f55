"""The default training density of a process, and the check that a density fits its process."""

from __future__ import annotations

from ..core.noise import EDMProcess, NoiseProcess, RectifiedFlowProcess, VPProcess
from .base import TimestepDistribution
from .flow import LogitNormalTimesteps
from .lognormal import LogNormalSigma
from .uniform import UniformTimesteps

__all__ = ["default_timesteps", "check_timesteps"]


def default_timesteps(process: NoiseProcess) -> TimestepDistribution:
    """Uniform t for VP, EDM's log-normal sigma for EDM, SD3's logit-normal t for rectified flow."""
    if isinstance(process, VPProcess):
        return UniformTimesteps(process.num_timesteps)
    if isinstance(process, RectifiedFlowProcess):
        return LogitNormalTimesteps(0.0, 1.0)
    assert isinstance(process, EDMProcess)
    return LogNormalSigma(process.P_mean, process.P_std)


def check_timesteps(timesteps: TimestepDistribution, process: NoiseProcess) -> None:
    """One sentence if ``timesteps`` draws another kind of level (or another T) than ``process`` takes."""
    # level_kind: what a level is (timestep, sigma or flow time t); classes without it are told by discrete
    wanted, drawn = getattr(process, "level_kind", None), getattr(timesteps, "level_kind", None)
    names = {"timestep": "discrete timesteps", "sigma": "continuous sigma", "t": "the flow time t in [0, 1]"}
    if wanted is not None and drawn is not None and wanted != drawn:
        raise ValueError(f"timesteps={type(timesteps).__name__} draws {names.get(drawn, drawn)}, but "
                         f"{type(process).__name__} needs {names.get(wanted, wanted)}.")
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
