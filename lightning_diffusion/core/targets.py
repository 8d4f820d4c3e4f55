"""Regression targets (ALGORITHMS.md 0; the Stable Target Field of section 2 builds on this).

A target object maps one training draw to the tensor the model output is regressed on, in the
prediction's space. All targets share the signature
``target(param, x0, noise, x_noisy, level, class_labels) -> Tensor`` so YAML can swap them.
"""

from __future__ import annotations

from torch import Tensor

from .precondition import Parametrization

__all__ = ["RegressionTarget", "StandardTarget"]


class RegressionTarget:
    """Protocol for regression targets; computed without gradients."""

    def __call__(
        self,
        param: Parametrization,
        x0: Tensor,
        noise: Tensor,
        x_noisy: Tensor,
        level: Tensor,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StandardTarget(RegressionTarget):
    """The usual target: the sample's own eps, x0 or v (one-sample estimate of the target field)."""

    def __call__(
        self,
        param: Parametrization,
        x0: Tensor,
        noise: Tensor,
        x_noisy: Tensor,
        level: Tensor,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        return param.target(x0, noise, level)
