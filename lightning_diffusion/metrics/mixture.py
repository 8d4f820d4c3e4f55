"""Scores against a Gaussian mixture's exact truth (docs/algorithms.md 7.2): excess denoising error, exact FD.

Nothing here is estimated against another finite sample of the data: the optimal denoiser, the
Bayes error, the data mean and covariance and the density are the mixture's own closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..core.noise import NoiseProcess
from ..data.mixture import GaussianMixture


def sigma_grid(num_levels: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``num_levels`` VE noise levels ``sigma = s / a``, log-spaced from ``sigma_min`` to ``sigma_max`` (float64)."""
    return torch.logspace(math.log10(sigma_min), math.log10(sigma_max), num_levels, dtype=torch.float64)


def levels_for_sigmas(process: NoiseProcess, sigmas: Tensor) -> Tensor:
    """Each process's own level nearest to VE ``sigma``: so VP, EDM and flow are scored at the same SNRs.

    Equal ``s / a`` means equal information in ``x_t`` (``x_t / a = x0 + (s / a) eps``), hence the same
    ``D*`` up to that scaling and the same Bayes error: per-level scores compare across processes.
    A discrete process (VP) gives its nearest timestep in log sigma; the Bayes error is then computed
    at that timestep's own ``(a, s)``, so it stays exact.
    """
    return process.level_from_sigma(sigmas.float())


class DenoisingEvaluation:
    """Fixed ``x0``, labels, noise and levels; the exact ``D*`` and Bayes error at each level.

    ``excess(denoise)`` returns, per level, ``E||D_model(x_t) - D*(x_t)||^2`` per pixel on these fixed
    draws. Since ``D*`` is the conditional mean, a model's error ``E||D_model - x0||^2`` is the Bayes
    error plus this excess (exactly in expectation), so ``excess / bayes`` is how far above the limit
    no network can beat the model sits.
    """

    def __init__(self, mixture: GaussianMixture, process: NoiseProcess, sigmas: Tensor, size: int,
                 seed: int = 0, conditional: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.sigmas = sigmas
        self.levels = levels_for_sigmas(process, sigmas)
        self.x0, labels = mixture.sample(size, generator)
        self.labels = labels if conditional else None
        self.noise = torch.randn((len(sigmas), *self.x0.shape), generator=generator)
        a, s = process.alpha_sigma(self.levels)
        self.alpha, self.sigma = a.double(), s.double()
        d_star, bayes = [], []
        for i in range(len(sigmas)):
            x_t = self.noisy(i)
            d, b = mixture.posterior(x_t, self.alpha[i], self.sigma[i], self.labels)
            d_star.append(d.float().reshape(self.x0.shape))
            bayes.append(b.mean() / mixture.dim)
        self.d_star = torch.stack(d_star)
        self.bayes = torch.stack(bayes)  # [L] Bayes error per pixel at each level (closed form, averaged)

    def noisy(self, i: int) -> Tensor:
        """``x_t = a x0 + s eps`` at level ``i``, float32, CPU."""
        return (self.alpha[i] * self.x0.double() + self.sigma[i] * self.noise[i].double()).float()

    @torch.no_grad()
    def excess(self, denoise: Callable[[Tensor, Tensor, Tensor | None], Tensor], device: torch.device,
               index: Tensor, batch_size: int = 1024) -> Tensor:
        """Sum over ``index`` (this rank's share of the fixed set) of ``||D_model - D*||^2`` per pixel, [L] float64."""
        sums = torch.zeros(len(self.sigmas), dtype=torch.float64, device=device)
        for i in range(len(self.sigmas)):
            x_t, d_star = self.noisy(i)[index], self.d_star[i][index]
            labels = None if self.labels is None else self.labels[index]
            for start in range(0, len(index), batch_size):
                chunk = slice(start, start + batch_size)
                x = x_t[chunk].to(device)
                level = self.levels[i].expand(x.shape[0]).to(device)
                y = None if labels is None else labels[chunk].to(device)
                pred = denoise(x, level, y).float()
                err = (pred - d_star[chunk].to(device)).square().flatten(1).mean(1)
                sums[i] += err.double().sum()
        return sums


def excess_percent(excess: Tensor, bayes: Tensor) -> Tensor:
    """``100 (exp(mean_l log(1 + excess_l / bayes_l)) - 1)``: geometric mean over levels of error / Bayes error.

    docs/algorithms.md 7.2, equation (7.5).

    The plain sum over levels is dominated by the noisiest level (the Bayes error grows ~40x over
    the grid, and an eps-model's x0 error at high noise is many times the Bayes error); the geometric
    mean of per-level ratios weighs every level alike.
    """
    ratio = 1 + excess.double().cpu() / bayes.double().cpu()
    return 100 * (ratio.log().mean().exp() - 1)


def exact_fd(samples: Tensor, mixture: GaussianMixture) -> Tensor:
    """Frechet distance of samples' mean/covariance to the mixture's exact ``(m, C)`` (docs/algorithms.md 7.2, (7.6))."""
    x = samples.detach().cpu().double().reshape(samples.shape[0], -1)
    mu, cov = x.mean(0), torch.cov(x.T)
    m, c = mixture.mean, mixture.covariance
    vals, vecs = torch.linalg.eigh(c)
    root = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root @ cov @ root).clamp_min(0).sqrt().sum()
    return (mu - m).square().sum() + cov.trace() + c.trace() - 2 * middle


def sample_scores(samples: Tensor, labels: Tensor | None, mixture: GaussianMixture,
                  entropy: float) -> dict[str, Tensor]:
    """``fd_exact``, ``nll_gap`` and, for class-conditional samples, ``class_accuracy``.

    ``class_accuracy``: how often the mixture's most probable class is the requested one.
    ``nll_gap`` is ``mean(-log p(x | c)) - H`` in nats per pixel (``log p(x)`` without labels), with
    ``H`` the mixture's (class-conditional) entropy per pixel for the same label mix (``entropy``):
    about 0 for true samples; positive for samples in low-density regions, negative for samples
    crowding the modes.
    """
    labels = None if labels is None else labels.cpu()
    scores = {"fd_exact": exact_fd(samples, mixture),
              "nll_gap": -mixture.log_prob(samples, labels).mean() / mixture.dim - entropy}
    if labels is not None:
        scores["class_accuracy"] = (mixture.classify(samples) == labels).double().mean()
    return scores
