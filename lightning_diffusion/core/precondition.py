"""Parametrizations: what the network predicts and how it maps to x0 (docs/algorithms.md 0).

* VP: the raw network output is eps, x0 or ``v = a eps - s x0`` (inverse: ``x0 = a x_t - s v``).
* EDM: the network ``F`` is preconditioned, ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``,
  and the prediction is the denoiser ``D`` (x0 space).
* Rectified flow: the network predicts the velocity ``u = eps - x0`` (``"flow"``); with
  ``x_t = a x0 + s eps``, ``x0 = (x_t - s u) / (a + s)`` and ``eps = (x_t + a u) / (a + s)``
  (docs/algorithms.md 6; ``a + s = 1`` on the flow path).

A :class:`Parametrization` pairs a process with a prediction type and gives the module one
signature for every case: ``predict`` (model output in prediction space), ``target`` (the
regression target in that space) and ``to_x0`` (for sampling and metrics).
"""

from __future__ import annotations

from torch import Tensor, nn

from .noise import EDMProcess, NoiseProcess, RectifiedFlowProcess, _expand

__all__ = ["PREDICTIONS", "edm_coefficients", "Parametrization", "check_prediction"]

PREDICTIONS = ("eps", "x0", "v", "flow")


def check_prediction(prediction: str, process: NoiseProcess) -> None:
    """Refuse prediction types the process cannot train, with one sentence naming the setting."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is not supported; use one of {PREDICTIONS}.")
    if isinstance(process, EDMProcess) and prediction != "x0":
        raise ValueError(
            f"prediction={prediction!r} does not fit EDMProcess: the EDM-preconditioned network "
            "predicts the denoised image, so use prediction='x0'."
        )
    flow = isinstance(process, RectifiedFlowProcess)
    if flow and prediction != "flow":
        raise ValueError(f"prediction={prediction!r} does not fit RectifiedFlowProcess: its network predicts the "
                         "velocity eps - x0, so use prediction='flow'.")
    if prediction == "flow" and not flow:
        raise ValueError(f"prediction='flow' (the velocity eps - x0) needs process: RectifiedFlowProcess; "
                         f"{type(process).__name__} trains 'eps', 'x0' or 'v'.")


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): ``(c_skip, c_out, c_in, c_noise)``."""
    sigma = sigma.float()
    sd2 = sigma_data**2
    denom = sigma**2 + sd2
    c_skip = sd2 / denom
    c_out = sigma * sigma_data / denom.sqrt()
    c_in = denom.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class Parametrization:
    """Bind a process and a prediction type; the module calls the network only through this.

    Example::

        param = Parametrization(VPProcess(), "v")
        out = param.predict(net, x_t, t)
        loss = (out - param.target(x0, noise, t)) ** 2
    """

    def __init__(self, process: NoiseProcess, prediction: str) -> None:
        check_prediction(prediction, process)
        self.process = process
        self.prediction = prediction
        self.edm = isinstance(process, EDMProcess)

    def predict(self, net: nn.Module, x_noisy: Tensor, level: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Model output in prediction space (the denoiser ``D`` for EDM)."""
        if self.edm:
            c_skip, c_out, c_in, c_noise = edm_coefficients(level, self.process.sigma_data)
            f = net(x_noisy * _expand(c_in, x_noisy), c_noise, class_labels)
            # Preconditioning in fp32 (outside any autocast dtype), docs/algorithms.md 0.
            return _expand(c_skip, x_noisy) * x_noisy.float() + _expand(c_out, x_noisy) * f.float()
        return net(x_noisy, self.process.network_level(level), class_labels).float()

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """Standard regression target in prediction space."""
        if self.prediction == "x0":
            return x0
        if self.prediction == "eps":
            return noise
        if self.prediction == "flow":
            return noise - x0
        a, s = self.process.alpha_sigma(level)
        return _expand(a, x0) * noise - _expand(s, x0) * x0

    def target_from_x0(self, x0_target: Tensor, x_noisy: Tensor, level: Tensor) -> Tensor:
        """Target in prediction space derived from an x0-space target (used by Stable Target Field)."""
        if self.prediction == "x0":
            return x0_target
        a, s = self.process.alpha_sigma(level)
        a, s = _expand(a, x0_target), _expand(s, x0_target)
        eps = (x_noisy - a * x0_target) / s
        if self.prediction == "flow":
            return eps - x0_target  # = (x_t - x0*) / t on the flow path
        return eps if self.prediction == "eps" else a * eps - s * x0_target

    def to_x0(self, output: Tensor, x_noisy: Tensor, level: Tensor) -> Tensor:
        """Convert a model output to the x0 estimate (for VP eps: ``(x_t - s eps) / a``)."""
        if self.prediction == "x0":
            return output
        a, s = self.process.alpha_sigma(level)
        a, s = _expand(a, output), _expand(s, output)
        if self.prediction == "eps":
            return (x_noisy - s * output) / a
        if self.prediction == "flow":
            return (x_noisy - s * output) / (a + s)
        return a * x_noisy - s * output

    def to_eps(self, output: Tensor, x_noisy: Tensor, level: Tensor) -> Tensor:
        """Convert a model output to the eps estimate (DDIM needs it)."""
        if self.prediction == "eps":
            return output
        a, s = self.process.alpha_sigma(level)
        a, s = _expand(a, output), _expand(s, output)
        if self.prediction == "x0":
            return (x_noisy - a * output) / s
        if self.prediction == "flow":
            return (x_noisy + a * output) / (a + s)
        return s * x_noisy + a * output
