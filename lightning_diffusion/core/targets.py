"""Regression targets (docs/algorithms.md 0 and 2): the standard one and the Stable Target Field.

A target object maps one training draw to the tensor the model output is regressed on, in the
prediction's space. All targets share the signature
``target(param, x0, noise, x_noisy, level, class_labels, data_labels=None) -> Tensor`` so YAML can
swap them: ``class_labels`` are what the network is conditioned on (the null label where guidance
dropout hid it), ``data_labels`` the images' true labels (default: ``class_labels``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .precondition import Parametrization
from .references import ReferenceSource, make_reference_source, own_duplicates

__all__ = ["RegressionTarget", "StandardTarget", "StableTargetField", "stf_target"]


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
        data_labels: Tensor | None = None,
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
        data_labels: Tensor | None = None,
    ) -> Tensor:
        return param.target(x0, noise, level)


def _per_sample(value: Tensor | float, batch: int, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1).expand(batch)


@torch.no_grad()
def stf_target(
    x_noisy: Tensor,
    sigma: Tensor | float,
    references: Tensor,
    own_index: Tensor | None = None,
    *,
    scale: Tensor | float = 1.0,
    labels: Tensor | None = None,
    ref_labels: Tensor | None = None,
    null_label: int | None = None,
    exclude: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Stable Target Field x0 target (docs/algorithms.md 2): ``sum_j softmax_j(logit_ij) r_j``.

    ``logit_ij = -||x_i - a_i r_j||^2 / (2 s_i^2)`` with ``x_noisy = a y + s n`` (EDM: ``a = 1``,
    ``s = sigma``; VP: ``a_t, s_t``). ``references`` [n, ...] must contain each sample's own clean
    image exactly once, at ``own_index`` [B] (default ``arange(B)``: the batch first).

    Computed without gradients in fp32 (fp64 inputs stay fp64) with autocast off. Distances are
    expanded as ``|x|^2 - 2 x.r + |r|^2`` and the row constant ``|x|^2`` dropped (softmax is
    shift-invariant), one matmul per chunk of ``chunk_size`` references: memory is the [B, n]
    logits plus one chunk, never a [B, n, d] tensor.

    Class-conditional option: with ``labels`` [B] and ``ref_labels`` [n], sample i only attends to
    references of its class; samples whose label is ``null_label`` (guidance dropout) attend to all.
    ``exclude`` drops references, for every sample ([n] bool) or per sample ([B, n] bool, e.g.
    other copies of the sample's own image, :func:`~.references.own_duplicates`); a sample's own
    reference is never dropped.
    """
    batch, n = x_noisy.shape[0], references.shape[0]
    dtype = torch.float64 if x_noisy.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x_noisy.device.type, enabled=False):
        x = x_noisy.reshape(batch, -1).to(dtype)
        refs = references.reshape(n, -1).to(dtype)
        a = _per_sample(scale, batch, x).to(dtype)
        s = _per_sample(sigma, batch, x).to(dtype)
        # logit_ij = (a_i x_i.r_j - a_i^2 |r_j|^2 / 2) / s_i^2 (+ a constant per row, dropped).
        row_scale = (a / s.square())[:, None]
        half_sq = (a.square() / (2 * s.square()))[:, None]
        logits = torch.empty(batch, n, dtype=dtype, device=x.device)
        for start in range(0, n, chunk_size):
            chunk = refs[start : start + chunk_size]
            logits[:, start : start + chunk.shape[0]] = row_scale * (x @ chunk.T) - half_sq * chunk.square().sum(1)
        allowed = None
        if labels is not None and ref_labels is not None:
            allowed = labels[:, None] == ref_labels[None, :]
            if null_label is not None:
                allowed |= (labels == null_label)[:, None]
        if exclude is not None:
            keep = ~(exclude if exclude.ndim == 2 else exclude[None, :])
            allowed = keep if allowed is None else allowed & keep
        if allowed is not None:
            own = torch.arange(batch, device=x.device) if own_index is None else own_index
            allowed = allowed.clone() if allowed.shape[0] == batch else allowed.expand(batch, n).clone()
            allowed[torch.arange(batch, device=x.device), own] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        target = torch.zeros_like(x)
        for start in range(0, n, chunk_size):
            target += weights[:, start : start + chunk_size] @ refs[start : start + chunk_size]
    return target.reshape(x_noisy.shape)


class StableTargetField(RegressionTarget):
    """Stable Target Field targets (Xu et al. 2023; docs/algorithms.md 2) for any process and prediction.

    The x0 target is :func:`stf_target` over a reference set holding the minibatch plus extra data;
    eps/v targets are derived from it (``Parametrization.target_from_x0``). Sources of the extras:

    * ``"fresh"`` (the paper): ``reference_size - B`` new images per step from the DataModule's
      training set (a second stream, seeded per rank and per draw, so resumes are exact);
    * ``"gather"``: the minibatches of all DDP ranks (``world_size * B`` references, no loading);
    * ``"queue"``: a FIFO of the last ``reference_size - B`` training images (no extra loading);
    * ``"batch"``: the minibatch only.

    Other copies of a sample's own image (a batch duplicate, a queued or fresh draw of the same
    item) are dropped for that sample only, so its own image is present exactly once. Each
    micro-batch builds its own set (gradient accumulation). ``class_conditional`` restricts each
    sample to references of its true class; samples whose label guidance dropout replaced by
    the null label use all references, and the references (and the queue) keep true labels.

    Example (YAML)::

        model:
          init_args:
            target: {class_path: lightning_diffusion.core.targets.StableTargetField,
                     init_args: {reference_size: 1024, source: fresh}}
    """

    def __init__(
        self,
        reference_size: int = 1024,
        source: str = "fresh",
        class_conditional: bool = False,
        chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"StableTargetField.chunk_size={chunk_size} must be >= 1.")
        self.reference_size, self.source_name = reference_size, source
        self.class_conditional, self.chunk_size, self.seed = class_conditional, chunk_size, seed
        self.source: ReferenceSource = make_reference_source(source, reference_size, seed)
        self.null_label: int | None = None

    def setup(self, module: Any) -> None:
        """Attach to the run (data stream, DDP group, batch size checks); learn the null label."""
        self.null_label = module.num_classes if getattr(module, "num_classes", 0) else None
        self.source.setup(module)

    def __call__(
        self,
        param: Parametrization,
        x0: Tensor,
        noise: Tensor,
        x_noisy: Tensor,
        level: Tensor,
        class_labels: Tensor | None = None,
        data_labels: Tensor | None = None,
    ) -> Tensor:
        true_labels = class_labels if data_labels is None else data_labels  # references keep these
        refs = self.source.references(x0, true_labels)
        a, s = param.process.alpha_sigma(level)
        use_labels = self.class_conditional and class_labels is not None and refs.labels is not None
        exclude = own_duplicates(refs.images, refs.own_index, x0.shape[0])  # own image exactly once
        if refs.exclude is not None:
            exclude |= refs.exclude[None, :]
        x0_target = stf_target(
            x_noisy, s, refs.images, refs.own_index, scale=a,
            labels=class_labels if use_labels else None, ref_labels=refs.labels if use_labels else None,
            null_label=self.null_label, exclude=exclude, chunk_size=self.chunk_size,
        )
        self.source.after_step(x0, true_labels)
        return param.target_from_x0(x0_target.to(x_noisy.dtype), x_noisy, level)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"StableTargetField(reference_size={self.reference_size}, source={self.source_name!r}, "
                f"class_conditional={self.class_conditional})")

