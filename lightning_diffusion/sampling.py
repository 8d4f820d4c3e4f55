"""Generation for a trained module: the noise-level grid, the VE-space denoiser, guidance.

Solvers (``core/solvers.py``) work in the scaled space ``x = x_t / a_t`` with ``sigma = s_t / a_t``.
This file adapts a parametrized network to that space: EDM networks are already denoisers of
``x + sigma n``; VP networks are called at the discrete timestep whose sigma is nearest.
Rectified flow is sampled in its own time instead: the ODE ``dx/dt = v`` from t = 1 to 0 with the
network's velocity (docs/algorithms.md 6).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core.noise import EDMProcess, RectifiedFlowProcess, VPProcess
from .core.precondition import Parametrization
from .core.solvers import FLOW_SOLVERS, SOLVERS, flow_times, karras_sigmas

__all__ = ["DiffusionSampler", "VEDenoiser", "FlowVelocity", "VP_SIGMA_MAX"]

# EDM's sigma_max: starting VP sampling here instead of at t = T-1 changes the initial
# distribution by less than (data std / 80)^2 in variance.
VP_SIGMA_MAX = 80.0


class _Guided:
    """Classifier-free guidance around ``_predict(x, level, labels)``: ``uncond + w (cond - uncond)``.

    One batched call for both halves; without labels or at ``guidance == 1`` the conditional call alone.
    """

    def __init__(self, param: Parametrization, net: nn.Module, labels: Tensor | None,
                 null_label: int, guidance: float) -> None:
        self.param, self.net, self.labels = param, net, labels
        self.null_label, self.guidance = null_label, guidance

    def _predict(self, x: Tensor, level: Tensor, labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, level: Tensor) -> Tensor:
        if self.labels is None or self.guidance == 1.0:
            return self._predict(x, level, self.labels).to(x.dtype)
        null = torch.full_like(self.labels, self.null_label)
        both = self._predict(torch.cat([x, x]), torch.cat([level, level]), torch.cat([self.labels, null]))
        cond, uncond = both.chunk(2)
        return (uncond + self.guidance * (cond - uncond)).to(x.dtype)


class VEDenoiser(_Guided):
    """``denoiser(x, sigma) -> x0`` for a parametrized network, with classifier-free guidance."""

    def __init__(self, param: Parametrization, net: nn.Module, labels: Tensor | None,
                 null_label: int, guidance: float) -> None:
        super().__init__(param, net, labels, null_label, guidance)
        if isinstance(param.process, VPProcess):
            abar = param.process.alphas_cumprod
            self.log_sigmas = (((1 - abar) / abar).sqrt().log()).float()

    def _predict(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        if self.param.edm:
            return self.param.predict(self.net, x, sigma, labels)
        # Nearest discrete timestep in log-sigma; exact on the sampler's grid.
        log_sigmas = self.log_sigmas.to(x.device)
        mid = (log_sigmas[1:] + log_sigmas[:-1]) / 2
        t = torch.bucketize(sigma.log(), mid)
        a, _ = self.param.process.alpha_sigma(t)
        x_t = x * a.reshape(-1, *([1] * (x.ndim - 1)))
        out = self.param.predict(self.net, x_t, t, labels)
        return self.param.to_x0(out, x_t.float(), t)


class FlowVelocity(_Guided):
    """``velocity(x, t) -> v`` of a flow network, with classifier-free guidance on v."""

    def _predict(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        return self.param.predict(self.net, x, t, labels)


class DiffusionSampler:
    """Builds the sigma grid and runs a solver (``"heun"``, ``"euler"`` or ``"ddim"``).

    Example::

        sampler = DiffusionSampler(Parametrization(VPProcess(), "eps"), num_steps=50, solver="ddim")
        images = sampler.sample(net, 16, (1, 8, 8), "cpu")
    """

    def __init__(self, param: Parametrization, num_steps: int = 32, solver: str = "heun") -> None:
        self.param = param
        self.num_steps = num_steps
        self.solver = solver
        self.flow = isinstance(param.process, RectifiedFlowProcess)
        self._check(num_steps, solver)

    def _check(self, num_steps: int, solver: str) -> None:
        solvers = FLOW_SOLVERS if self.flow else SOLVERS
        if solver not in solvers:
            where = " with RectifiedFlowProcess" if self.flow else ""
            raise ValueError(f"sample_solver={solver!r} is not supported{where}; use one of {sorted(solvers)}.")
        if num_steps < 1:
            raise ValueError(f"sample_steps={num_steps} must be >= 1.")

    def sigmas(self, num_steps: int) -> Tensor:
        """Descending float64 grid ending in 0."""
        process = self.param.process
        if isinstance(process, EDMProcess):
            return karras_sigmas(num_steps, process.sigma_min, process.sigma_max)
        abar = process.alphas_cumprod
        sigma_table = ((1 - abar) / abar).sqrt()
        # EDM's spacing (rho = 7) snapped to the nearest trained timesteps, starting at the
        # noisiest step with sigma <= VP_SIGMA_MAX: beyond it x is pure noise anyway, and one Heun
        # step across sigma ~ 1e4 -> 10 diverges (zero terminal SNR even has sigma = inf there).
        last = int((sigma_table <= VP_SIGMA_MAX).nonzero().max())
        wanted = karras_sigmas(num_steps, float(sigma_table[0]), float(sigma_table[last]))[:-1]
        t = (wanted.log()[:, None] - sigma_table[: last + 1].log()[None]).abs().argmin(1).unique_consecutive()
        return torch.cat([sigma_table[t], sigma_table.new_zeros(1)])

    def sample(self, net: nn.Module, num_samples: int, shape: tuple[int, ...], device: torch.device | str,
               class_labels: Tensor | None = None, num_classes: int = 0, num_steps: int | None = None,
               solver: str | None = None, guidance: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        num_steps, solver = num_steps or self.num_steps, solver or self.solver
        self._check(num_steps, solver)
        labels = None
        if num_classes > 0:
            labels = class_labels if class_labels is not None else torch.full((num_samples,), num_classes)
            labels = labels.to(device)
        if self.flow:
            velocity = FlowVelocity(self.param, net, labels, num_classes, guidance)
            x = torch.randn((num_samples, *shape), generator=generator, device=device)
            return FLOW_SOLVERS[solver](velocity, x, flow_times(num_steps), generator=generator)
        sigmas = self.sigmas(num_steps)
        denoiser = VEDenoiser(self.param, net, labels, num_classes, guidance)
        x = torch.randn((num_samples, *shape), generator=generator, device=device) * float(sigmas[0])
        return SOLVERS[solver](denoiser, x, sigmas, generator=generator)
