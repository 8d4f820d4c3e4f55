"""The learned timestep sampler pi_phi(t | x0) of adaptive non-uniform sampling (docs/algorithms.md 4).

A small CNN reads the clean image and outputs a Beta distribution over ``u'`` in [0, 1]; ``u'`` is
mapped into the current range ``[u_low, u_high]`` of the base density's CDF and through its
inverse CDF to a level: ``t = floor(u T)`` for uniform discrete timesteps (**choice**: through the
base icdf, so a uniform ``u`` gives exactly uniform t, where ``round(u (T-1))`` would give the two
end timesteps half weight), sigma for EDM. The policy learns by REINFORCE
(:meth:`AdaptiveTimesteps.policy_step`) from the look-ahead reward that
:mod:`~lightning_diffusion.timesteps.lookahead` measures (the decrease of the weighted training
loss, or of the variational bound's per-timestep term: ``AdaptiveTimestepSampling.reward``).
The diffusion loss is not reweighted.
Pure torch: no Lightning import.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import InverseCDFDistribution, LearnedSampler
from .beta import beta_sample

__all__ = ["TimestepPolicy", "AdaptiveTimesteps"]

# Beta draws are kept this far from 0 and 1 (docs/algorithms.md 4), so log pi(u) stays finite.
_U_CLAMP = 1e-6


class TimestepPolicy(nn.Module):
    """x0 -> (alpha, beta) of a Beta over u': convolutions, global average pooling (any resolution),
    an MLP, and ``softplus(o) + 1e-5``. The last layer starts at W = 0, b = 0.5, so at init every
    image gets Beta(0.974, 0.974): near uniform (docs/algorithms.md 4).
    """

    def __init__(self, in_channels: int, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 2))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.constant_(self.head[-1].bias, 0.5)

    def forward(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        ab = F.softplus(self.head(self.features(x0))) + 1e-5
        return ab[:, 0], ab[:, 1]


class AdaptiveTimesteps(LearnedSampler):
    """Draw each sample's level from a learned, image-conditioned Beta over the base density's CDF.

    Args:
        base: the density whose inverse CDF maps u to a level (``UniformTimesteps`` for VP,
            ``LogNormalSigma`` or any :class:`InverseCDFDistribution` for EDM).
        lr: learning rate of the policy's own Adam optimizer.
        policy_channels: width of the policy CNN.
        seed: seed of the policy's initial weights (identical on every DDP rank).

    The policy is built at the first draw, on the images' device and for their channel count;
    the draw's ``x0`` and ``u'`` are kept for the REINFORCE step of the same optimizer step.

    Example::

        timesteps = AdaptiveTimesteps(UniformTimesteps(1000))
        t, weight = timesteps.sample(64, "cuda", generator=g, x0=images)  # weight == 1
    """

    def __init__(self, base: InverseCDFDistribution, lr: float = 1e-2, policy_channels: int = 32,
                 seed: int = 0) -> None:
        super().__init__(base)
        if not lr > 0:
            raise ValueError(f"AdaptiveTimesteps.lr={lr} must be > 0.")
        self.lr, self.policy_channels, self.seed = float(lr), int(policy_channels), int(seed)
        self.policy: TimestepPolicy | None = None
        self.optimizer: torch.optim.Adam | None = None
        self._pending: dict[str, Any] | None = None
        self.last_x0: Tensor | None = None
        self.last_u: Tensor | None = None
        self.last_labels: Tensor | None = None

    # ------------------------------------------------------------------ policy
    def build(self, in_channels: int, device: torch.device | str) -> TimestepPolicy:
        """The policy (built once, from ``seed``; restored state applied) on ``device``."""
        if self.policy is None:
            with torch.random.fork_rng(devices=[]):  # same weights on every rank, global RNG untouched
                torch.manual_seed(self.seed)
                self.policy = TimestepPolicy(in_channels, self.policy_channels)
            self.policy.to(device)
            self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
            if self._pending is not None:
                self._load_policy(self._pending)
                self._pending = None
        elif next(self.policy.parameters()).device != torch.device(device):
            state = self._policy_state()
            self.policy.to(device)
            self._load_policy(state)  # the optimizer's moments follow the parameters
        return self.policy

    def _policy_state(self) -> dict[str, Any]:
        assert self.policy is not None and self.optimizer is not None
        return {"in_channels": self.policy.features[0].in_channels, "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def _load_policy(self, state: dict[str, Any]) -> None:
        assert self.policy is not None and self.optimizer is not None
        have = self.policy.features[0].in_channels
        if state["in_channels"] != have:
            raise ValueError(f"AdaptiveTimesteps: the checkpoint's policy reads {state['in_channels']} channels, "
                             f"these images have {have}.")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])

    def beta_params(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, beta)`` per image in fp32 with autocast off (with gradients if enabled)."""
        if x0.ndim != 4:
            raise ValueError(f"AdaptiveTimesteps reads images [B, C, H, W]; got x0 of shape {tuple(x0.shape)}.")
        policy = self.build(x0.shape[1], x0.device)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            return policy(x0.float())

    # ------------------------------------------------------------------ TimestepDistribution
    def sample(self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
               x0: Tensor | None = None, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x0 is None or x0.shape[0] != batch_size:
            raise ValueError("AdaptiveTimesteps.sample needs the batch's clean images x0 (one per level drawn).")
        with torch.no_grad():
            alpha, beta = self.beta_params(x0)
            u = beta_sample(alpha, beta, generator).clamp(_U_CLAMP, 1 - _U_CLAMP)
        # The draw's images, labels and u', for the look-ahead and REINFORCE step of this optimizer step.
        self.last_x0, self.last_u, self.last_labels = x0.detach(), u, labels
        # Restricted range (curriculum): u = u_low + (u_high - u_low) u', then the base icdf.
        level = self.base.icdf(self.u_low + (self.u_high - self.u_low) * u.double())
        return self.record(level, torch.ones(batch_size, device=x0.device))

    # ------------------------------------------------------------------ learning
    def policy_loss(self, x0: Tensor, u: Tensor, reward: Tensor, ent_coef: float) -> Tensor:
        """REINFORCE with an entropy bonus: ``-mean(log pi(u|x) R) - ent_coef mean(H)`` (docs/algorithms.md 4)."""
        alpha, beta = self.beta_params(x0)
        dist = torch.distributions.Beta(alpha, beta)
        return -(dist.log_prob(u.float()) * reward.detach().float()).mean() - ent_coef * dist.entropy().mean()

    def policy_step(self, x0: Tensor, u: Tensor, reward: Tensor, ent_coef: float = 1e-2, max_grad_norm: float = 1.0,
                    reduce_grads: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """One Adam step on :meth:`policy_loss`; ``reduce_grads`` averages the flat gradient over
        DDP ranks (so every rank takes the identical step) before clipping to ``max_grad_norm``.
        """
        self.build(x0.shape[1], x0.device)
        assert self.policy is not None and self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            loss = self.policy_loss(x0, u, reward, ent_coef)
            loss.backward()
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if reduce_grads is not None:
            flat = reduce_grads(torch.cat([p.grad.flatten() for p in params]))
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.optimizer.step()
        return loss.detach()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        policy = self._policy_state() if self.policy is not None else self._pending
        return {"base": self.base.state_dict(), "u_low": self.u_low, "u_high": self.u_high, "policy": policy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "policy" not in state:  # a checkpoint of the plain base density: start a fresh policy
            self.base.load_state_dict(state)
            self.u_low, self.u_high = self.base.u_low, self.base.u_high
            return
        self.base.load_state_dict(state["base"])
        self.u_low, self.u_high = float(state["u_low"]), float(state["u_high"])
        if state["policy"] is None:
            return
        if self.policy is None:
            self._pending = state["policy"]  # applied when the policy is built (device known)
        else:
            self._load_policy(state["policy"])

    def __repr__(self) -> str:
        return (f"AdaptiveTimesteps(base={self.base!r}, lr={self.lr}, policy_channels={self.policy_channels}, "
                f"seed={self.seed})")

