"""Noise processes: how clean data x0 is corrupted at a noise level, and its SNR (docs/algorithms.md 0).

Two families share one small protocol so the module, weightings and solvers never branch on a
string:

* ``VPProcess``: discrete variance-preserving DDPM chains, ``x_t = a_t x0 + s_t eps``; the noise
  level is an integer timestep ``t`` in ``[0, T)``.
* ``EDMProcess``: continuous variance-exploding noise, ``x = y + sigma n``; the noise level is
  ``sigma`` itself.
* ``RectifiedFlowProcess``: the straight path ``x_t = (1 - t) x0 + t eps`` of rectified flow; the
  noise level is ``t`` in [0, 1] (docs/algorithms.md 6).

Both expose ``scale_and_sigma(level) -> (a, sigma_ve)`` so that ``x_t = a * (x0 + sigma_ve * eps)``:
every solver works in the scaled (VE) space, and every SNR is ``1 / sigma_ve**2``.
All tables are float64; lookups return float32 on the level's device (no host sync).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NoiseProcess", "VPProcess", "EDMProcess", "RectifiedFlowProcess", "make_betas"]


class NoiseProcess:
    """Protocol shared by every noise process (duck-typed; subclasses override all methods)."""

    discrete: bool = False
    level_kind: str | None = None  # what a level is: "timestep" (VP), "sigma" (EDM) or "t" (flow)

    def network_level(self, level: Tensor) -> Tensor:
        """What the network is given as its noise level (float32); VP: the timestep itself."""
        return level.float()

    def level_from_sigma(self, sigma: Tensor) -> Tensor:
        """The continuous level with VE noise ``sigma = s / a`` (EDM: sigma itself)."""
        return sigma

    def scale_and_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(a, sigma)`` with ``x_level = a * (x0 + sigma * eps)``, float32, per sample."""
        raise NotImplementedError

    def snr(self, level: Tensor) -> Tensor:
        """Signal-to-noise ratio at ``level`` in float32 (>= 0, may be exactly 0)."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """Corrupt ``x0`` with ``noise`` at per-sample ``level``: ``a x0 + a sigma eps``."""
        a, sigma = self.scale_and_sigma(level)
        a, sigma = _expand(a, x0), _expand(sigma, x0)
        return a * x0 + (a * sigma) * noise

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, s)`` with ``x_level = a x0 + s eps`` in float32 (VE processes: ``(1, sigma)``)."""
        a, sigma = self.scale_and_sigma(level)
        return a, a * sigma

    def training_quantile(self, level: Tensor) -> Tensor:
        """Where ``level`` sits in the default training range, in [0, 1] (0 = least noise)."""
        raise NotImplementedError

    def validation_levels(self, n: int) -> Tensor:
        """A fixed grid of ``n`` noise levels spanning training, for comparable validation losses."""
        raise NotImplementedError


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample vector [B] against a batch [B, ...]."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def make_betas(schedule: str, num_timesteps: int) -> Tensor:
    """Beta schedules of docs/algorithms.md 0 in float64 (linear scaled to any T, cosine, scaled_linear)."""
    T = num_timesteps
    if schedule == "linear":
        scale = 1000.0 / T
        return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
    if schedule == "cosine":
        # Nichol & Dhariwal: abar(u) = cos^2(((u + s) / (1 + s)) * pi / 2), s = 0.008.
        u = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.clamp(1 - abar[1:] / abar[:-1], max=0.999)
    if schedule == "scaled_linear":
        return torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    raise ValueError(
        f"VPProcess.schedule={schedule!r} is not supported; use 'linear', 'cosine' or 'scaled_linear'."
    )


def _zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(abar) so the last value is 0 and the first unchanged (Lin et al. 2024)."""
    s = alphas_cumprod.sqrt()
    first, last = s[0].clone(), s[-1].clone()
    s = (s - last) * first / (first - last)
    return s**2


class _DeviceTable:
    """A float64 CPU table with a float32 copy cached per device, so lookups never sync."""

    def __init__(self, values: Tensor) -> None:
        self.values = values
        self._cache: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor:
        table = self._cache.get(device)
        if table is None:
            table = self._cache[device] = self.values.to(device=device, dtype=torch.float32)
        return table

    def __getstate__(self) -> dict:
        return {"values": self.values, "_cache": {}}  # device copies are rebuilt lazily


class VPProcess(NoiseProcess):
    """Discrete variance-preserving DDPM process with T steps (docs/algorithms.md 0).

    ``SNR(t) = abar_t / (1 - abar_t)``, ``a_t = sqrt(abar_t)``, ``sigma_t = sqrt((1 - abar_t) / abar_t)``.

    Example::

        process = VPProcess(schedule="cosine", num_timesteps=1000, zero_terminal_snr=True)
        x_t = process.add_noise(x0, torch.randn_like(x0), t)
    """

    discrete = True
    level_kind = "timestep"

    def __init__(
        self,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
    ) -> None:
        if num_timesteps < 2:
            raise ValueError(f"VPProcess.num_timesteps={num_timesteps} must be at least 2.")
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        betas = make_betas(schedule, num_timesteps)
        abar = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            abar = _zero_terminal_snr(abar)
            betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        self.betas: Tensor = betas
        self.alphas_cumprod: Tensor = abar
        self._sqrt_abar = _DeviceTable(abar.sqrt())
        self._sqrt_one_minus = _DeviceTable((1 - abar).sqrt())
        # SNR = abar / (1 - abar); the first entry is finite since beta_0 > 0.
        self._snr = _DeviceTable(abar / (1 - abar))

    def scale_and_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        t = level.long()
        a = self._sqrt_abar.on(t.device)[t]
        s = self._sqrt_one_minus.on(t.device)[t]
        return a, s / a  # inf sigma at a zero-terminal-SNR step: only solvers see it, and skip it

    def snr(self, level: Tensor) -> Tensor:
        t = level.long()
        return self._snr.on(t.device)[t]

    def add_noise(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        # Direct a x0 + s eps: stays finite where a = 0 (zero terminal SNR).
        t = level.long()
        a = _expand(self._sqrt_abar.on(t.device)[t], x0)
        s = _expand(self._sqrt_one_minus.on(t.device)[t], x0)
        return a * x0 + s * noise

    def level_from_sigma(self, sigma: Tensor) -> Tensor:
        """The timestep whose VE noise ``s_t / a_t`` is nearest to ``sigma`` in log (int64): VP is discrete."""
        table = (self._sqrt_one_minus.on(sigma.device).double() / self._sqrt_abar.on(sigma.device).double()).log()
        return (table[None, :] - sigma.double().log().reshape(-1, 1)).abs().argmin(1).reshape(sigma.shape)

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t))`` in float32."""
        t = level.long()
        return self._sqrt_abar.on(t.device)[t], self._sqrt_one_minus.on(t.device)[t]

    def training_quantile(self, level: Tensor) -> Tensor:
        return (level.float() + 0.5) / self.num_timesteps

    def validation_levels(self, n: int) -> Tensor:
        return torch.linspace(0, self.num_timesteps - 1, n).round().long()

    def __repr__(self) -> str:
        return (
            f"VPProcess(schedule={self.schedule!r}, num_timesteps={self.num_timesteps}, "
            f"zero_terminal_snr={self.zero_terminal_snr})"
        )


class EDMProcess(NoiseProcess):
    """Continuous EDM process ``x = y + sigma n`` with the log-normal training density (docs/algorithms.md 0).

    ``snr_reference="unit"`` gives ``SNR = 1/sigma^2``; ``"sigma_data"`` gives ``sigma_data^2/sigma^2``.

    Example::

        process = EDMProcess(sigma_data=0.5, P_mean=-1.2, P_std=1.2)
    """

    discrete = False
    level_kind = "sigma"

    def __init__(
        self,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        snr_reference: str = "unit",
    ) -> None:
        if sigma_data <= 0:
            raise ValueError(f"EDMProcess.sigma_data={sigma_data} must be > 0.")
        if P_std <= 0:
            raise ValueError(f"EDMProcess.P_std={P_std} must be > 0.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"EDMProcess needs 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        if snr_reference not in ("unit", "sigma_data"):
            raise ValueError(
                f"EDMProcess.snr_reference={snr_reference!r} is not supported; use 'unit' or 'sigma_data'."
            )
        self.sigma_data = sigma_data
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.snr_reference = snr_reference

    def scale_and_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        sigma = level.float()
        return torch.ones_like(sigma), sigma

    def snr(self, level: Tensor) -> Tensor:
        ref = 1.0 if self.snr_reference == "unit" else self.sigma_data**2
        return ref / level.float() ** 2

    def add_noise(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        return x0 + _expand(level.float(), x0) * noise

    def training_quantile(self, level: Tensor) -> Tensor:
        z = (level.float().log() - self.P_mean) / self.P_std
        return 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))

    def validation_levels(self, n: int) -> Tensor:
        # Quantiles (k + 1/2)/n of the log-normal training density.
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        z = math.sqrt(2.0) * torch.erfinv(2 * q - 1)
        return torch.exp(self.P_mean + self.P_std * z).float()

    def __repr__(self) -> str:
        return (
            f"EDMProcess(sigma_data={self.sigma_data}, P_mean={self.P_mean}, P_std={self.P_std}, "
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, snr_reference={self.snr_reference!r})"
        )


# t is kept this far from 0 where an SNR is formed: SNR(1e-7) = 1e14 stays finite in float32.
_T_FLOOR = 1e-7


class RectifiedFlowProcess(NoiseProcess):
    """Rectified flow: ``x_t = (1 - t) x0 + t eps`` for ``t`` in [0, 1] (docs/algorithms.md 6).

    ``SNR(t) = ((1 - t) / t)^2``; in VE terms ``a = 1 - t`` and ``sigma = t / (1 - t)``. The network
    is trained to predict the velocity ``eps - x0`` (``prediction="flow"``) and is given
    ``1000 t`` as its noise level, the timestep scale its sinusoidal embedding was designed for
    (as in Stable Diffusion 3). ``t_min``/``t_max`` bound the log-SNR range of the curriculum's
    ``clustering="log_snr"`` only; training and sampling use the whole of [0, 1].

    Example::

        process = RectifiedFlowProcess()
        x_t = process.add_noise(x0, torch.randn_like(x0), t)      # t in [0, 1], shape [B]
    """

    discrete = False
    level_kind = "t"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3) -> None:
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"RectifiedFlowProcess needs 0 < t_min < t_max < 1; got t_min={t_min}, t_max={t_max}.")
        self.t_min, self.t_max = float(t_min), float(t_max)
        # The same range as VE sigma, for code written in sigma (the curriculum's log-SNR edges).
        self.sigma_min, self.sigma_max = self.t_min / (1 - self.t_min), self.t_max / (1 - self.t_max)

    def network_level(self, level: Tensor) -> Tensor:
        return level.float() * 1000.0

    def level_from_sigma(self, sigma: Tensor) -> Tensor:
        return sigma / (1 + sigma)

    def scale_and_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        t = level.float()
        return 1 - t, t / (1 - t)  # inf sigma at t = 1: only VE-space code sees it, and flow sampling is not

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        t = level.float()
        return 1 - t, t

    def snr(self, level: Tensor) -> Tensor:
        t = level.float()
        return ((1 - t) / t.clamp_min(_T_FLOOR)).square()

    def add_noise(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        t = _expand(level.float(), x0)
        return (1 - t) * x0 + t * noise

    def training_quantile(self, level: Tensor) -> Tensor:
        return level.float().clamp(0, 1)

    def validation_levels(self, n: int) -> Tensor:
        # Midpoints of n equal bins of [0, 1]: every part of the path, whatever density trains it.
        return (torch.arange(n, dtype=torch.float32) + 0.5) / n

    def __repr__(self) -> str:
        return f"RectifiedFlowProcess(t_min={self.t_min}, t_max={self.t_max})"
