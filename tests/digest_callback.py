"""Test-only callbacks: each rank writes a JSON digest of its training state at the end of fit,
and (``StepRecorder``) one line per training step with what that step trained on.

Used by the distributed and crash-resume tests (tests/test_full_stack_ddp.py,
tests/test_crash_resume.py), which add them to a CLI run in a subprocess with
``--trainer.callbacks+=digest_callback.DigestCallback`` and put ``tests/`` on ``PYTHONPATH``.
The digests go to ``$LD_DIGEST_DIR/rank<global_rank>.json`` (steps: ``steps-rank<r>.jsonl``);
the tests compare the files. Every entry is a SHA-256 of the exact bytes: "equal" means
bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diffusion.callbacks import PostHocEMA, TimestepCurriculum
from lightning_diffusion.core.shards import local

DIGEST_DIR_ENV = "LD_DIGEST_DIR"


def subprocess_env(digest_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess that uses these callbacks: ``tests/`` on ``PYTHONPATH``, digests
    to ``digest_dir``; no inherited ``MASTER_ADDR``/``MASTER_PORT``/``OMP_NUM_THREADS`` (``extra`` may set them)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), *filter(None, [env.get("PYTHONPATH")])])
    env[DIGEST_DIR_ENV] = str(digest_dir)
    env.update(extra)
    return env


def _feed(h: Any, value: Any) -> None:
    """Feed a nested state (dicts, lists, tensors, scalars) into a hash, in a fixed order."""
    if isinstance(value, torch.Tensor):
        t = local(value).detach().cpu().contiguous()  # FSDP2: this rank's rows
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


def digest(value: Any) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


class DigestCallback(pl.Callback):
    """Records, per rank: parameter, EMA and timestep-sampler hashes, curriculum stage, steps."""

    def __init__(self) -> None:
        self.warm_steps: list[int] = []  # optimizer steps after which the loss-aware sampler was warm

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        warm = getattr(pl_module.timesteps, "warm", None)
        if warm is not None and bool(warm):
            self.warm_steps.append(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "params": digest({name: p for name, p in pl_module.named_parameters()}),
            "param_names": [name for name, _ in pl_module.named_parameters()],
            "timesteps_type": type(pl_module.timesteps).__name__,
            "timesteps": digest(pl_module.timesteps.state_dict()),
            "warm_steps": self.warm_steps,
            "checkpoint_io": type(trainer.strategy.checkpoint_io).__name__,
            "draws": getattr(pl_module, "draws", None),
            "optimizers": digest([optimizer.state_dict() for optimizer in trainer.optimizers]),
            "lr_schedulers": digest([config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]),
            "data_position": trainer.fit_loop._combined_loader._state_dicts(),
        }
        for callback in trainer.callbacks:
            if isinstance(callback, PostHocEMA) and callback.ema is not None:
                ema = callback.ema
                out["ema_num_updates"] = ema.num_updates
                out["ema_nimg"] = ema.nimg
                out["ema"] = [{name: digest(t) for name, t in zip(ema.param_names, averages)}
                              for averages in ema.averages]
                out["ema_buffers"] = {name: digest(t) for name, t in zip(ema.buffer_names, ema.buffers)}
                out["ema_snapshots"] = [entry["file"] for entry in callback.snapshots]
                out["ema_dir"] = str(callback._directory) if callback._directory is not None else None
            if isinstance(callback, TimestepCurriculum):
                out["curriculum_stage"] = callback.stage
                out["curriculum_switches"] = [dict(s) for s in callback.switches]
        directory = Path(os.environ[DIGEST_DIR_ENV])
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(out, indent=1, sort_keys=True))


class StepRecorder(pl.Callback):
    """Appends ``{"step", "batch", "levels"}`` per optimizer step to ``steps-rank<r>.jsonl`` (flushed each step).

    ``batch`` digests the images and labels the step trained on, ``levels`` the noise levels it
    drew: together the data order and the timestep stream. Written line by line, so a run killed
    with SIGKILL leaves every step it finished on disk.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        record = {"step": trainer.global_step, "batch": digest(list(batch)), "levels": digest(outputs["level"])}
        directory = Path(os.environ[DIGEST_DIR_ENV])
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"steps-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

