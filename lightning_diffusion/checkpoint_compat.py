"""Checkpoints of another configuration: plain hyperparameters, and one sentence when a checkpoint
does not fit the model (docs/architecture.md "Rules the code keeps": safe loading, clear errors).

Hyperparameters are kept only when plain (strings, numbers, lists, dicts of them), so checkpoints
load with ``torch.load(weights_only=True)``. On resume the run's own settings are used: the ones that
differ from the checkpoint's are named; a checkpoint whose tensors do not fit is refused.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["is_plain", "setting_changes", "check_checkpoint_fits"]


def is_plain(value: Any) -> bool:
    """Whether ``value`` is a string, number, bool, None, or a list/tuple/str-keyed dict of those."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        return {k: v for key, value in config.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): config}


def setting_changes(module: pl.LightningModule, checkpoint: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, the checkpoint's value, this run's)`` for each hyperparameter that differs."""
    before, now = _flat(dict(checkpoint.get("hyper_parameters") or {})), _flat(dict(module.hparams))
    return [(k, before[k], now[k]) for k in sorted(set(before) & set(now)) if before[k] != now[k]]


def check_checkpoint_fits(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse, in one sentence, a checkpoint whose tensors do not fit the model (another config);
    name the settings that differ when it fits (the run's own settings are used)."""
    saved = checkpoint.get("state_dict")
    if saved is None:
        return
    changes = setting_changes(module, checkpoint)
    own = module.state_dict()
    # A 0-dim value and a 1-element vector fit each other: EDM2's gains became [1] for FSDP2 (a load hook reshapes).
    wrong_shape = sorted(k for k in set(saved) & set(own) if tuple(saved[k].shape) != tuple(own[k].shape)
                         and not saved[k].numel() == own[k].numel() == 1)
    unmatched = sorted(k for k in set(saved) ^ set(own) if not k.startswith("fd."))  # FD states stay out
    if not wrong_shape and not unmatched:
        if changes:
            rank_zero_info("--ckpt_path: resuming with this run's model settings where they differ from the "
                           "checkpoint's: " + ", ".join(f"{k}={now!r} (checkpoint: {was!r})" for k, was, now in changes))
        return
    differ = [f"{k}={was!r} in the checkpoint but {now!r} now" for k, was, now in changes]
    if differ:
        reason = ", ".join(differ)
    elif wrong_shape:
        k = wrong_shape[0]
        reason = f"tensor {k!r} has shape {list(saved[k].shape)} in the checkpoint but {list(own[k].shape)} here"
    else:
        k = unmatched[0]
        reason = f"tensor {k!r} is {'only in the checkpoint' if k in saved else 'not in the checkpoint'}"
    raise ValueError(f"--ckpt_path: the checkpoint does not match the model ({reason}); resume with the "
                     f"checkpoint's settings or start a new run without ckpt_path.")
