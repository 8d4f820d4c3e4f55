"""Fit a class-conditional Gaussian mixture by EM (the shipped digits mixture; docs/algorithms.md 7.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .mixture import GaussianMixture


def _log_gauss(x: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """log N(x_i; mu_k, Sigma_k) as [n, K] through Cholesky factors (float64)."""
    chol = torch.linalg.cholesky(covs)  # [K, D, D]
    diff = x[None] - means[:, None]  # [K, n, D]
    sol = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)  # [K, D, n]
    logdet = 2 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(1)  # [K]
    return (-0.5 * (sol.square().sum(1) + logdet[:, None] + x.shape[1] * math.log(2 * math.pi))).T


def _kmeans(x: Tensor, k: int, generator: torch.Generator, iters: int = 20) -> Tensor:
    """Hard assignments [n] from k-means with k-means++ seeding."""
    centers = x[torch.randint(x.shape[0], (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centers).square().min(1).values
        centers = torch.cat([centers, x[torch.multinomial(d2, 1, generator=generator)]])
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        centers = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centers[j] for j in range(k)])
    return torch.cdist(x, centers).argmin(1)


def fit_class(x: Tensor, k: int, reg: float, generator: torch.Generator, iters: int = 200,
              tol: float = 1e-7) -> tuple[Tensor, Tensor, Tensor, float]:
    """EM for one class's ``k`` full-covariance components: ``(weights, means, covs, mean log-likelihood)``.

    ``reg`` is added to every covariance's diagonal at each M-step: with ~60 images per component
    in 64 dimensions the sample covariances are singular (constant border pixels), and the floor
    keeps every eigenvalue >= reg so the denoiser's posterior stays well defined.
    """
    n, d = x.shape
    resp = torch.nn.functional.one_hot(_kmeans(x, k, generator), k).double()
    eye = torch.eye(d, dtype=torch.float64)
    previous = -math.inf
    for _ in range(iters):
        counts = resp.sum(0) + 1e-12
        weights = counts / n
        means = (resp.T @ x) / counts[:, None]
        diff = x[None] - means[:, None]  # [K, n, D]
        covs = torch.einsum("kn,knd,kne->kde", resp.T, diff, diff) / counts[:, None, None] + reg * eye
        log_joint = _log_gauss(x, means, covs) + weights.log()[None]
        total = torch.logsumexp(log_joint, dim=1)
        resp = (log_joint - total[:, None]).exp()
        loglik = float(total.mean())
        if loglik - previous < tol:
            break
        previous = loglik
    return weights, means, covs, loglik


def fit_mixture(images: Tensor, labels: Tensor, components_per_class: int = 3, reg: float = 3e-3,
                seed: int = 0, iters: int = 200) -> tuple[GaussianMixture, dict[int, float]]:
    """A :class:`GaussianMixture` with ``components_per_class`` components per class, fitted by EM.

    ``images`` [N, C, H, W] float in [-1, 1]; class priors are the label frequencies. Returns the
    mixture and each class's mean log-likelihood per image (nats) at convergence.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(images.shape[1:])
    x_all = images.double().reshape(images.shape[0], -1)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    classes: list[int] = []
    logliks: dict[int, float] = {}
    for c in labels.unique().tolist():
        x = x_all[labels == c]
        w, mu, cov, ll = fit_class(x, components_per_class, reg, generator, iters)
        parts.append((w * x.shape[0] / x_all.shape[0], mu, cov))
        classes += [int(c)] * components_per_class
        logliks[int(c)] = ll
    weights = torch.cat([p[0] for p in parts])
    means = torch.cat([p[1] for p in parts])
    covs = torch.cat([p[2] for p in parts])
    eigvals, eigvecs = torch.linalg.eigh(covs)
    mixture = GaussianMixture(weights, means, eigvecs, eigvals.clamp_min(reg), torch.tensor(classes), shape)
    return mixture, logliks
