"""PostHocEMA: power-function EMA profiles, snapshots for post-hoc reconstruction, EMA validation.

A thin adapter over :mod:`lightning_diffusion.ema` (docs/algorithms.md 3.4-3.5): the math lives there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..clock import ImageClock, images_seen
from ..ema import PowerFunctionEMA, check_sigma_rel, snapshot_name, write_manifest
from ..ema.snapshots import DTYPES, load_manifest
from ..sharding import check_strategy
from .ema_shards import load_sharded_averages, sharded_checkpoint_entries, write_once, write_shard_snapshot
from .steps import OptimizerStepGate

__all__ = ["PostHocEMA"]


class PostHocEMA(pl.Callback):
    """Track power-function EMA profiles of the network and write snapshots for post-hoc EMA.

    Args:
        sigma_rels: relative widths of the tracked profiles, each in (0, 0.2887).
        update_every_n_steps: update once every this many optimizer steps (the decay uses the
            full gap in images, so the profile stays right).
        snapshot_every_nimg: write every profile to ``dirpath`` each time this many more images
            were seen; ``None`` writes no snapshots.
        dirpath: snapshot folder (default ``<trainer.log_dir>/phema``; a resumed run keeps the folder
            its checkpoint was written with, so one folder holds the whole run); global rank 0 writes
            ``phema-<nimg>-<sigma_rel>.pt`` files and ``manifest.json``, atomically.
        snapshot_dtype: ``"float32"`` or ``"float16"``.
        validate_with: the profile (index, or one of ``sigma_rels``) swapped into the network for
            validation and test; ``None`` validates the raw weights.
        offload_to_cpu: keep the averages in CPU memory.
        gather_snapshots: on a sharded (FSDP2) model, gather each snapshot into one file on global
            rank 0 instead of writing one file per shard (the default; docs/sharding.md). Unsharded
            models always write one file.
        module: attribute path of the tracked submodule (``"net"``, ``"model.unet"``); default:
            ``net`` when the LightningModule has one, else the whole module.

    Sharded models (FSDP2, docs/sharding.md): each rank averages its own rows of each parameter, with no
    gather per step; snapshots are one file per shard plus the manifest (``gather_snapshots=True``: one
    file); the averages go into the distributed checkpoint as sharded tensors (a gathered checkpoint:
    whole ones), and ``lightning-diffusion-phema`` rebuilds whole weights from either on one CPU.

    Works on any LightningModule: it reads only the tracked parameters and buffers, and the image
    clock (:mod:`lightning_diffusion.clock`), which counts each batch's leading size when the
    module and DataModule say nothing. Snapshot keys are the LightningModule's ``state_dict`` keys
    (``net.*``), so a snapshot loads into the module with ``strict=False``. The EMA updates once per optimizer
    step on every rank (identical tensors everywhere). The swapped-in profile is swapped back in
    ``on_validation_end`` / ``on_test_end``: after the module's and the other callbacks'
    ``on_validation_epoch_end`` (so FD and sample grids see the EMA) and before ``ModelCheckpoint``
    saves (it runs last). An average with no update yet is never swapped in: during ``fit``
    (sanity check included) validation then runs on the raw weights with a warning; a
    ``validate``/``test`` run raises, since its numbers would be mislabeled, unless the checkpoint
    was written by ``lightning-diffusion-phema rebuild``: it already holds EMA weights, used as they are.

    Example::

        trainer = pl.Trainer(callbacks=[PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_every_nimg=2**20,
                                                   validate_with=0.10)])
    """

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), update_every_n_steps: int = 1,
                 snapshot_every_nimg: int | None = None, dirpath: str | None = None,
                 snapshot_dtype: str = "float32", validate_with: int | float | None = None,
                 offload_to_cpu: bool = False, module: str | None = None, gather_snapshots: bool = False) -> None:
        self.sigma_rels = [check_sigma_rel(s, "PostHocEMA.sigma_rels") for s in sigma_rels]
        if update_every_n_steps < 1:
            raise ValueError(f"PostHocEMA.update_every_n_steps={update_every_n_steps} must be >= 1.")
        if snapshot_every_nimg is not None and snapshot_every_nimg < 1:
            raise ValueError(f"PostHocEMA.snapshot_every_nimg={snapshot_every_nimg} must be >= 1 or None.")
        if snapshot_dtype not in DTYPES:
            raise ValueError(f"PostHocEMA.snapshot_dtype={snapshot_dtype!r} must be one of {sorted(DTYPES)}.")
        self.update_every_n_steps, self.snapshot_every_nimg = update_every_n_steps, snapshot_every_nimg
        self.dirpath, self.snapshot_dtype, self.offload_to_cpu = dirpath, snapshot_dtype, offload_to_cpu
        self.validate_index = self._profile_index(validate_with)
        self.module, self.gather_snapshots = module, gather_snapshots
        self.gate = OptimizerStepGate()
        self.ema: PowerFunctionEMA | None = None
        self.prefix = ""
        self._pending: dict[str, Any] | None = None
        self._directory: Path | None = None
        self._last_step, self._last_nimg, self._next_snapshot = 0, 0, snapshot_every_nimg or 0
        self.snapshots: list[dict[str, Any]] = []
        self._rebuilt: dict[str, Any] | None = None
        self._root: pl.LightningModule | None = None  # the EMA is made at first use: after FSDP2 sharded the model
        self._distributed_checkpoint = False  # sharded averages go into the checkpoint's sharded state_dict
        self._ckpt_path: str | None = None
        self._writer = True

    def _profile_index(self, validate_with: int | float | None) -> int | None:
        if validate_with is None:
            return None
        if isinstance(validate_with, int) and 0 <= validate_with < len(self.sigma_rels):
            return validate_with
        for i, s in enumerate(self.sigma_rels):
            if abs(s - float(validate_with)) < 1e-9:
                return i
        raise ValueError(f"PostHocEMA.validate_with={validate_with} must be an index below {len(self.sigma_rels)} "
                         f"or one of sigma_rels={self.sigma_rels}.")

    @property
    def state_key(self) -> str:
        return "PostHocEMA"  # independent of the init arguments: a resume may change e.g. validate_with

    # ------------------------------------------------------------------ allocation and state
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, "PostHocEMA")
        ImageClock.attach(trainer)  # the counted images seen: EMA decay and snapshot times read it
        _tracked(pl_module, self.module)  # a wrong module path is one sentence now, not at the first step
        self._root = pl_module
        self._distributed_checkpoint = bool(getattr(trainer.strategy, "_save_distributed_checkpoint", False))
        self._writer = trainer.is_global_zero
        if stage == "fit" and self.snapshot_every_nimg:
            self._dir(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._root = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.gate.start(trainer)

    def _get_ema(self) -> PowerFunctionEMA:
        # Made and restored at first use, on every rank at once (a hook, or a checkpoint save): after
        # Lightning moved the module and FSDP2 sharded it, so the averages are shards, never a full copy.
        if self.ema is None:
            assert self._root is not None, "PostHocEMA is used before setup"
            module, self.prefix = _tracked(self._root, self.module)
            self.ema = PowerFunctionEMA(module, self.sigma_rels, offload_to_cpu=self.offload_to_cpu)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.ema.load_state_dict(pending)
            if pending["averages"] is None:  # kept in the distributed checkpoint's sharded state_dict
                load_sharded_averages(self.ema, self._ckpt_path)
        return self.ema

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None and self._root is None:
            ema = self._pending
        else:
            current, averages = self._get_ema(), "local"
            if current.sharded:  # whole averages only where the one file is written (global rank 0)
                averages = "none" if self._distributed_checkpoint else ("gathered" if self._writer else
                                                                         "gathered_elsewhere")
            ema = current.state_dict(averages)
        directory = str(self._directory.resolve()) if self._directory is not None else ""
        return {"ema": ema, "last_step": self._last_step, "last_nimg": self._last_nimg,
                "next_snapshot_nimg": self._next_snapshot, "snapshots": [dict(s) for s in self.snapshots],
                "directory": directory}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # A sharded EMA under a distributed checkpoint: its averages join the sharded state_dict, which
        # every rank writes its part of (the callbacks' state goes to one file on rank 0 only).
        if self.ema is not None and self.ema.sharded and self._distributed_checkpoint and "state_dict" in checkpoint:
            checkpoint["state_dict"].update(sharded_checkpoint_entries(self.ema))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # A checkpoint from ``lightning-diffusion-phema rebuild`` already holds EMA weights.
        self._rebuilt = checkpoint.get("phema")
        self._ckpt_path = str(trainer.ckpt_path) if trainer.ckpt_path else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict["ema"]
        self._last_step, self._last_nimg = int(state_dict["last_step"]), int(state_dict["last_nimg"])
        self._next_snapshot = int(state_dict["next_snapshot_nimg"])
        self.snapshots = [dict(s) for s in state_dict["snapshots"]]
        # A resumed run (the CLI logs it to a new version folder) keeps writing its snapshots next to
        # the ones it already wrote, so one folder and manifest hold the whole run. That holds too when
        # the checkpoint came before the first snapshot (the folder is not made yet, but the run's log
        # folder is here). An explicit dirpath, or a run folder that is not here (checkpoint moved),
        # starts in the new one instead.
        previous = state_dict.get("directory")
        if not self.dirpath and previous and (Path(previous).is_dir() or Path(previous).parent.is_dir()):
            self._directory = Path(previous)
            rank_zero_info(f"PostHocEMA: resumed; writing snapshots to {previous}, next to the run's earlier ones")

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.gate.passed(trainer):  # a micro-batch of gradient accumulation: no optimizer step
            return
        step = self._last_step = trainer.global_step
        if step % self.update_every_n_steps:
            return
        nimg = images_seen(trainer)
        ema = self._get_ema()
        ema.update(nimg, nimg - self._last_nimg)
        self._last_nimg = nimg
        if self.snapshot_every_nimg and nimg >= self._next_snapshot:
            self._next_snapshot = (nimg // self.snapshot_every_nimg + 1) * self.snapshot_every_nimg
            self._write_snapshots(trainer, ema, nimg)

    def _dir(self, trainer: pl.Trainer) -> Path:
        # Resolved once, in setup on every rank: trainer.log_dir broadcasts under DDP.
        if self._directory is None:
            self._directory = Path(self.dirpath) if self.dirpath else (
                Path(trainer.log_dir or trainer.default_root_dir) / "phema")
        return self._directory

    def _write_snapshots(self, trainer: pl.Trainer, ema: PowerFunctionEMA, nimg: int) -> None:
        directory = self._dir(trainer)
        for i, (sigma_rel, gamma) in enumerate(zip(ema.sigma_rels, ema.gammas)):
            if ema.sharded and not self.gather_snapshots:
                entry = write_shard_snapshot(directory, ema, i, nimg, self.prefix, self.snapshot_dtype)
            else:
                entry = {"file": snapshot_name(nimg, sigma_rel), "nimg": nimg, "sigma_rel": sigma_rel, "gamma": gamma}
                # sharded: every rank takes part in gathering; an unsharded EMA is read on rank 0 only
                state = ema.gathered_profile_state_dict(i, keep=trainer.is_global_zero) if ema.sharded else None
                if trainer.is_global_zero:
                    state = state if state is not None else ema.profile_state_dict(i)
                    write_once(directory / entry["file"], {self.prefix + k: v for k, v in state.items()}, sigma_rel,
                               gamma, nimg, self.snapshot_dtype)
            self.snapshots.append(entry)  # every rank keeps the same list
        if ema.sharded:
            trainer.strategy.barrier("PostHocEMA.snapshots")  # every rank's file is written before the manifest
        if trainer.is_global_zero:
            # Only snapshots whose files are all here: after a resume into a new folder the earlier ones live elsewhere.
            known = {e["file"]: e for e in load_manifest(directory) + self.snapshots
                     if all((directory / f).exists() for f in e.get("files", [e["file"]]))}
            write_manifest(directory, list(known.values()))

    # ------------------------------------------------------------------ validation and test
    def _swap_in(self, trainer: pl.Trainer) -> None:
        if self.validate_index is None:
            return
        if self._rebuilt is not None and trainer.state.fn != "fit":
            rank_zero_info(f"PostHocEMA: the checkpoint holds post-hoc EMA weights (sigma_rel="
                           f"{self._rebuilt['sigma_rel']:.4f}); validating them as they are.")
            return
        ema = self._get_ema()
        if ema.num_updates == 0:
            message = (f"PostHocEMA.validate_with: the sigma_rel={self.sigma_rels[self.validate_index]} average "
                       "has had no update yet")
            if trainer.state.fn != "fit":
                # A setting that cannot work (the CLI prints it as one line, exit 2), not a crash.
                raise ValueError(message + "; load a checkpoint that holds PostHocEMA state (--ckpt_path) or set "
                                 "validate_with: null to validate the raw weights.")
            if not trainer.sanity_checking:
                rank_zero_warn(message + "; validating the raw weights.")
            return
        ema.swap_in(self.validate_index)

    def _swap_out(self) -> None:
        if self.ema is not None:
            self.ema.swap_out()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()  # never leave averaged weights in the module


def _tracked(pl_module: pl.LightningModule, path: str | None) -> tuple[nn.Module, str]:
    """The submodule at ``path`` (default ``net`` if present, else the whole module) and its key prefix."""
    if path is None:
        net = getattr(pl_module, "net", None)
        return (net, "net.") if isinstance(net, nn.Module) else (pl_module, "")
    module: Any = pl_module
    for name in path.split("."):
        module = getattr(module, name, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"PostHocEMA.module={path!r}: {type(pl_module).__name__} has no submodule there; give "
                         f"the attribute path of the network to average (e.g. 'net'), or None for the whole module.")
    return module, path + "."
