"""The callback protocol: what a LightningModule offers the library's callbacks (docs/callbacks.md).

Any LightningModule (not only :class:`~lightning_diffusion.DiffusionLightningModule`) can host the
callbacks. Each callback reads only the parts it names below, checks for them at setup, and says
in one sentence which part is missing and how to add it:

=====================  ============================================================  ==========================
part                   what the module provides                                       read by
=====================  ============================================================  ==========================
parameters             nothing beyond ``nn.Module`` (``PostHocEMA(module="net")``)    PostHocEMA
``timesteps``          a :class:`~lightning_diffusion.timesteps.TimestepDistribution`  samplers, curriculum
                       attribute; ``training_step`` draws its levels with
                       ``self.timesteps.sample(B, device, generator, x0=x0, labels=y)``
``process``            the noise process (VP, EDM or rectified flow) attribute          curriculum, VLB reward
``training_step``      returns a :class:`StepOutput` (:func:`step_output` builds it)   samplers, curriculum
``lookahead_loss``     ``lookahead_loss(x0, noise, level, labels) -> [B]``: the        AdaptiveTimestepSampling
                       per-sample training loss at given levels and noise (no grad)
``denoise``            ``denoise(x_noisy, level, labels) -> x0_hat`` (the VLB reward)  AdaptiveTimestepSampling,
                                                                                       GaussianMixtureMetrics
``sample``             ``sample(n, class_labels=y, generator=g, clamp=False)``         GaussianMixtureMetrics
                       ``-> [n, C, H, W]`` generated data, unclamped                  (``num_samples > 0``)
=====================  ============================================================  ==========================

Half-right integrations are errors, not silent no-ops: the samplers compare the levels a module
trained on with the ones their distribution drew, the curriculum checks that they lie in the
current stage, and the loss-aware sampler checks that its importance weights reach the loss.
"""

from __future__ import annotations

from typing import Any, TypedDict

from torch import Tensor

__all__ = ["StepOutput", "step_output", "require", "require_outputs", "HOW_TO"]


class StepOutput(TypedDict, total=False):
    """What ``training_step`` returns for the callbacks (a dict: Lightning reads ``loss``).

    Keys:
        loss: the scalar the optimizer minimizes: ``mean(importance_weight * per-sample loss)``.
        per_sample_loss: ``[B]`` detached per-sample losses at the drawn levels (loss-aware history,
            curriculum pacing).
        level: ``[B]`` the levels drawn from ``module.timesteps`` (``t`` or ``sigma``) for this batch.
        importance_weight: ``[B]`` the weights drawn with them; the loss must apply them.
    """

    loss: Tensor
    per_sample_loss: Tensor
    level: Tensor
    importance_weight: Tensor


def step_output(loss: Tensor, per_sample_loss: Tensor, level: Tensor, importance_weight: Tensor,
                **extra: Tensor) -> StepOutput:
    """The :class:`StepOutput` of one training step (``per_sample_loss`` detached); ``extra`` keys are kept."""
    out: dict[str, Any] = {"loss": loss, "per_sample_loss": per_sample_loss.detach(), "level": level,
                           "importance_weight": importance_weight, **extra}
    return out  # type: ignore[return-value]


# One sentence per part: what to add to a module that lacks it.
HOW_TO = {
    "timesteps": "a `timesteps` attribute (a TimestepDistribution, e.g. UniformTimesteps(1000)) whose "
                 "sample(B, device, generator, x0=x0, labels=labels) training_step calls for its noise levels",
    "process": "a `process` attribute (the noise process, e.g. VPProcess() or EDMProcess())",
    "lookahead_loss": "a method lookahead_loss(x0, noise, level, labels) returning the per-sample training loss "
                      "[B] at the given levels and noise",
    "denoise": "a method denoise(x_noisy, level, labels) returning the predicted clean data x0_hat",
    "sample": "a method sample(num_samples, class_labels=None, generator=None, clamp=False) returning generated "
              "data [n, C, H, W]",
}
OUTPUT_HOW_TO = "training_step must return a dict with {keys} (lightning_diffusion.protocol.step_output builds it)"


def require(pl_module: Any, owner: str, *parts: str) -> None:
    """Raise one sentence naming the first of ``parts`` the module lacks and how to add it."""
    for part in parts:
        value = getattr(pl_module, part, None)
        if value is None or (part in ("lookahead_loss", "denoise", "sample") and not callable(value)):
            raise ValueError(f"{owner} needs the module's `{part}`: give {type(pl_module).__name__} "
                             f"{HOW_TO[part]} (see docs/callbacks.md).")


def require_outputs(outputs: Any, owner: str, *keys: str) -> dict[str, Tensor]:
    """The training step's outputs, or one sentence if any of ``keys`` is missing."""
    if not isinstance(outputs, dict) or any(k not in outputs for k in keys):
        have = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        wanted = ", ".join(f"`{k}`" for k in keys)
        raise ValueError(f"{owner}: {OUTPUT_HOW_TO.format(keys=wanted)}; it returned {have} "
                         f"(see docs/callbacks.md).")
    return outputs
