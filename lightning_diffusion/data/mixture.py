"""A class-conditional Gaussian mixture whose optimal denoiser is known exactly (docs/algorithms.md 7).

``p(x0) = sum_k pi_k N(mu_k, Sigma_k)`` with ``Sigma_k = V_k diag(lam_k) V_k^T``; class ``c`` uses only
its own components. For any process ``x_t = a x0 + s eps`` (VP, EDM, rectified flow) the posterior
mean ``D*(x_t) = E[x0 | x_t, c]`` and the Bayes error ``E||x0 - D*||^2`` are closed-form, so a
model's denoiser can be scored against the truth instead of against another finite sample.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_write

DIGITS_MIXTURE_PATH = Path(__file__).resolve().parent / "assets" / "digits_mixture.npz"
_FIELDS = ("weights", "means", "eigvecs", "eigvals", "component_classes", "shape")


def _column(value: Tensor | float, n: int) -> Tensor:
    """A scalar or per-sample [n] coefficient as float64 [n, 1, 1] (broadcasts over components, dims)."""
    v = torch.as_tensor(value, dtype=torch.float64)
    return v.expand(n).reshape(n, 1, 1) if v.ndim == 0 else v.reshape(n, 1, 1)


class GaussianMixture:
    """A Gaussian mixture over images of ``shape`` (C, H, W), each component tied to one class.

    Args:
        weights: ``[K]`` component probabilities pi_k (normalized here).
        means: ``[K, D]`` component means, ``D = C*H*W``.
        eigvecs: ``[K, D, D]`` orthonormal eigenvectors V_k (columns) of each covariance.
        eigvals: ``[K, D]`` positive eigenvalues lam_k.
        component_classes: ``[K]`` the class each component belongs to (0..num_classes-1).
        shape: ``(C, H, W)`` of one sample.

    Everything is computed in float64 on the CPU; inputs and outputs may be float32 on any device.

    Example::

        mixture = GaussianMixture.digits()                  # 30 components fitted to the 8x8 digits
        x0, labels = mixture.sample(16, generator=torch.Generator().manual_seed(0))
        x_t = 0.6 * x0 + 0.8 * torch.randn_like(x0)
        d_star = mixture.posterior_mean(x_t, 0.6, 0.8, labels)   # the optimal denoiser
    """

    def __init__(self, weights: Tensor, means: Tensor, eigvecs: Tensor, eigvals: Tensor,
                 component_classes: Tensor, shape: tuple[int, int, int]) -> None:
        k, d = means.shape
        if math.prod(shape) != d or eigvecs.shape != (k, d, d) or eigvals.shape != (k, d) or weights.shape != (k,):
            raise ValueError(f"GaussianMixture: shapes do not agree (means {tuple(means.shape)}, eigvecs "
                             f"{tuple(eigvecs.shape)}, eigvals {tuple(eigvals.shape)}, weights {tuple(weights.shape)}, "
                             f"shape {tuple(shape)}).")
        if not bool((eigvals > 0).all()) or not bool((weights >= 0).all()):
            raise ValueError("GaussianMixture: eigvals must be positive and weights non-negative.")
        self.weights = weights.double() / weights.double().sum()
        self.means = means.double()
        self.eigvecs = eigvecs.double()
        self.eigvals = eigvals.double()
        self.component_classes = component_classes.long()
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(self.component_classes.max()) + 1
        self.class_probs = torch.zeros(self.num_classes, dtype=torch.float64).index_add_(
            0, self.component_classes, self.weights)

    # ------------------------------------------------------------------ files
    @classmethod
    def digits(cls) -> GaussianMixture:
        """The shipped mixture: 3 full-covariance components per class fitted to the 1,797 embedded digits."""
        return cls.load(DIGITS_MIXTURE_PATH)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianMixture:
        """Read a mixture saved by :meth:`save` (plain arrays: loading never runs code)."""
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: torch.from_numpy(f[name]) for name in _FIELDS}
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"GaussianMixture.load: {path} is not a mixture file with arrays {list(_FIELDS)} "
                             f"({type(error).__name__}: {error}).") from None
        shape = tuple(int(s) for s in arrays.pop("shape").tolist())
        return cls(**arrays, shape=shape)  # type: ignore[arg-type]

    def save(self, path: str | os.PathLike) -> None:
        """Write the parameters as float32 arrays, atomically (a crash leaves any old file intact)."""
        arrays = {"weights": self.weights.float(), "means": self.means.float(), "eigvecs": self.eigvecs.float(),
                  "eigvals": self.eigvals.float(), "component_classes": self.component_classes.to(torch.uint8),
                  "shape": torch.tensor(self.shape)}
        atomic_write(path, lambda f: np.savez_compressed(f, **{k: v.numpy() for k, v in arrays.items()}))

    # ------------------------------------------------------------------ moments
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        """``m = sum_k pi_k mu_k`` as float64 [D]."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """``C = sum_k pi_k (Sigma_k + mu_k mu_k^T) - m m^T`` as float64 [D, D]."""
        sigmas = (self.eigvecs * self.eigvals[:, None, :]) @ self.eigvecs.transpose(1, 2)
        second = sigmas + self.means[:, :, None] * self.means[:, None, :]
        m = self.mean
        return torch.einsum("k,kij->ij", self.weights, second) - torch.outer(m, m)

    # ------------------------------------------------------------------ sampling and densities
    def sample(self, n: int, generator: torch.Generator | None = None,
               class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x0 float32 [n, C, H, W], labels int64 [n])``; with ``class_labels``, each sample from its class."""
        if class_labels is None:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            labels = class_labels.long().cpu()
            within = self.weights * (self.component_classes[None, :] == labels[:, None])
            comp = torch.multinomial(within, 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + torch.einsum("nij,nj->ni", self.eigvecs[comp], z * self.eigvals[comp].sqrt())
        return x.float().reshape(n, *self.shape), self.component_classes[comp]

    def _log_joint(self, x: Tensor, a: Tensor | float, s: Tensor | float,
                   class_labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``log pi_k N(x; a mu_k, a^2 Sigma_k + s^2 I)`` [n, K], eigen-coordinates z [n, K, D], a [n,1,1]."""
        x = x.detach().cpu().double().reshape(x.shape[0], -1)
        n = x.shape[0]
        a_, s_ = _column(a, n), _column(s, n)
        z = torch.einsum("kdj,nkd->nkj", self.eigvecs, x[:, None, :] - a_ * self.means[None])  # V_k^T (x - a mu_k)
        var = a_.square() * self.eigvals[None] + s_.square()  # [n, K, D]
        log_n = -0.5 * ((z.square() / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        log_joint = log_n + self.weights.log()[None]
        if class_labels is not None:
            labels = class_labels.long().cpu().reshape(n, 1)
            # a label outside 0..num_classes-1 (the guidance null label) means "any class"
            own = (self.component_classes[None] == labels) | (labels >= self.num_classes)
            log_joint = log_joint.masked_fill(~own, -math.inf)
        return log_joint, z, a_

    def log_prob(self, x: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``log p(x)`` (or ``log p(x | c)`` with ``class_labels``) per sample, float64 [n], in nats."""
        log_joint, _, _ = self._log_joint(x, 1.0, 0.0, class_labels)
        norm = 0.0 if class_labels is None else self.class_probs[class_labels.long().cpu()].log()
        return torch.logsumexp(log_joint, dim=1) - norm

    def classify(self, x: Tensor) -> Tensor:
        """The most probable class of each sample under the mixture, int64 [n]."""
        log_joint, _, _ = self._log_joint(x, 1.0, 0.0, None)
        per_class = torch.full((x.shape[0], self.num_classes), -math.inf, dtype=torch.float64)
        for c in range(self.num_classes):
            per_class[:, c] = torch.logsumexp(log_joint[:, self.component_classes == c], dim=1)
        return per_class.argmax(1)

    # ------------------------------------------------------------------ the optimal denoiser
    def posterior(self, x_noisy: Tensor, a: Tensor | float, s: Tensor | float,
                  class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(D*(x_t) float64 [n, D], E[||x0 - D*||^2 | x_t] float64 [n])`` for ``x_t = a x0 + s eps``.

        docs/algorithms.md 7.2, equations (7.2) and (7.3).

        Per component: ``E[x0 | x_t, k] = mu_k + V_k diag(a lam / (a^2 lam + s^2)) V_k^T (x_t - a mu_k)``
        with posterior variances ``lam s^2 / (a^2 lam + s^2)``; responsibilities ``r_k`` from the log joint.
        The second output (the Bayes error at this ``x_t``) is ``sum_k r_k (tr_k + ||m_k - D*||^2)``.
        """
        log_joint, z, a_ = self._log_joint(x_noisy, a, s, class_labels)
        n = z.shape[0]
        s_ = _column(s, n)
        r = torch.softmax(log_joint, dim=1)  # [n, K]
        var = a_.square() * self.eigvals[None] + s_.square()
        shrink = a_ * self.eigvals[None] / var  # [n, K, D]
        m_k = self.means[None] + torch.einsum("kdj,nkj->nkd", self.eigvecs, shrink * z)
        d_star = torch.einsum("nk,nkd->nd", r, m_k)
        trace_k = (self.eigvals[None] * s_.square() / var).sum(-1)  # tr Cov(x0 | x_t, k)
        spread = (m_k - d_star[:, None]).square().sum(-1)
        return d_star, (r * (trace_k + spread)).sum(1)

    def posterior_mean(self, x_noisy: Tensor, a: Tensor | float, s: Tensor | float,
                       class_labels: Tensor | None = None) -> Tensor:
        """``D*(x_t) = E[x0 | x_t (, c)]`` shaped like ``x_noisy``, in its dtype and device."""
        d_star, _ = self.posterior(x_noisy, a, s, class_labels)
        return d_star.reshape(x_noisy.shape).to(dtype=x_noisy.dtype, device=x_noisy.device)
