"""Installing a learned timestep sampler into the module: shared by the two sampler callbacks."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl


def install_sampler(pl_module: pl.LightningModule, owner: str, own: type, rival: type, rival_owner: str,
                    build: Callable[[Any], Any]) -> Any:
    """Wrap ``pl_module.timesteps`` in ``build(current)`` once (kept if already an ``own``) and return it.

    Called in ``setup`` of every stage, so the module's checkpoint, which holds the sampler's state,
    always loads. Both samplers choose the training timesteps: a ``rival`` already installed is an error.
    """
    current = getattr(pl_module, "timesteps", None)
    if current is None:
        raise ValueError(f"{owner} needs a DiffusionLightningModule (a module with `timesteps`).")
    if isinstance(current, rival):
        raise ValueError(f"{owner} cannot be combined with {rival_owner}: both choose the training timesteps; "
                         f"keep one.")
    if not isinstance(current, own):
        current = build(current)
        pl_module.timesteps = current
    return current
