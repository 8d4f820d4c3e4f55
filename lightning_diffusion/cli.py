"""Command line: ``lightning-diffusion fit|validate|test|predict --config configs/<recipe>.yaml``.

A :class:`LightningCLI` in subclass mode for both the model and the data. The data's shape is
stated once: ``data.channels``, ``data.image_size`` and ``data.num_classes`` are linked into the
network's ``in_channels``, ``image_size`` and ``num_classes`` and the module's ``num_classes``; an
override of a linked setting that the link would replace is refused. A Rich progress bar counting
optimizer steps (``step`` N/max_steps) and a model summary are on by default; the config is saved
next to the logs by global rank 0 only, once the run has passed setup. The default logger writes
TensorBoard event files and ``metrics.csv`` into one ``version_N`` folder; ``validate``, ``test``
and ``predict`` from a checkpoint ``<run>/checkpoints/*.ckpt`` write into ``<run>/<subcommand>/``.
``PreemptionCheckpoint`` is on by default: SIGUSR1, SIGTERM or Ctrl-C saves a checkpoint at the
next optimizer step and exits with status 0. ``LastCheckpoint`` is on by default: ``last.ckpt`` at
the end of every fit (and every 30 minutes, or ``every_n_steps`` as a recipe sets it), beside
Lightning's after-validation ``ModelCheckpoint``. Every fit ends with ``samples/last.png`` and at
least one ``train/loss`` row in ``metrics.csv`` (``FinalTrainLoss``), however short. Checkpoints are
written atomically by ``AtomicCheckpointIO`` unless ``trainer.plugins`` or the strategy names another
CheckpointIO (or the accelerator is a TPU, which saves through XLA's).

Exit status: 0 done (or preempted and saved), 2 a bad setting (one ``error:`` line, nothing
written), 1 training diverged (one ``error:`` line naming the step and the last good checkpoint).

This file holds the CLI and the defaults it adds; what it shows and writes while a run goes is in
:mod:`lightning_diffusion.cli_output`, how it refuses a bad setting in :mod:`lightning_diffusion.cli_errors`.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .cli_errors import (OneLineErrorParser, _any_step_ran, _check_ckpt_path, _explicit_value,
                         _refuse_replaced_links, _remove_empty_log_dir, _root_cause)
# Re-exported: configs saved by earlier runs name them as lightning_diffusion.cli.<Name>.
from .cli_output import (_EVAL_WARNINGS, _QUIET_LOGS, _QUIET_WARNINGS, FinalTrainLoss, StepProgressBar,
                         SummaryWithoutZeroFlops, TensorBoardCSVLogger, _quiet)
from .data.base import ImageDataModule
from .module import DiffusionLightningModule, NonFiniteLossError

__all__ = ["DiffusionCLI", "FinalTrainLoss", "StepProgressBar", "SummaryWithoutZeroFlops", "TensorBoardCSVLogger",
           "main"]

# (source, target): the data's shape flows into the network and the module at instantiation.
LINKS = (
    ("data.channels", "model.init_args.net.init_args.in_channels"),
    ("data.image_size", "model.init_args.net.init_args.image_size"),
    ("data.num_classes", "model.init_args.net.init_args.num_classes"),
    ("data.num_classes", "model.init_args.num_classes"),
)


class DiffusionCLI(LightningCLI):
    """The library's CLI; use it from your own script to get the same links and defaults.

    Example::

        # my_train.py
        from lightning_diffusion.cli import DiffusionCLI
        if __name__ == "__main__":
            DiffusionCLI()
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: D107 - forwards LightningCLI's own arguments
        kwargs.setdefault("model_class", DiffusionLightningModule)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", SaveConfigAfterSetup)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", OneLineErrorParser)
        with _quiet(_QUIET_WARNINGS, _QUIET_LOGS):
            super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # State the data's shape once: the network and the module follow the DataModule.
        for source, target in LINKS:
            parser.link_arguments(source, target, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand:
            _check_ckpt_path(config.get("ckpt_path"), self.parser)
        self._linked_given = {target: _explicit_value(config, target) for _, target in LINKS}
        trainer = config.trainer
        trainer.callbacks = _default_callbacks(trainer)
        _default_logger(trainer, self.subcommand, config.get("ckpt_path"))
        accelerator = str(trainer.get("accelerator", "")).lower()
        # XLA saves through its own CheckpointIO (xm.save): leave TPU runs to Lightning's default.
        if not _checkpoint_io_configured(trainer) and "tpu" not in accelerator and "xla" not in accelerator:
            plugins = trainer.plugins if isinstance(trainer.plugins, list) else \
                [p for p in (trainer.plugins,) if p is not None]
            trainer.plugins = plugins + [Namespace(class_path="lightning_diffusion.checkpoint_io.AtomicCheckpointIO")]

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model settings with the ones stored in the checkpoint, silently:
        # `--ckpt_path` plus a lower learning rate (what the divergence message advises) trained on
        # with the old one, and another net config was swapped for the checkpoint's. Here the run's
        # own config decides; the module names the settings that differ from the checkpoint's and
        # refuses, in one sentence, a checkpoint that does not fit (module._check_checkpoint_fits).
        pass

    def instantiate_classes(self) -> None:
        # A bad setting (missing data path, image size the network cannot take, gamma <= 0, ...)
        # is reported as the one sentence that names it, not as a stack trace.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:
            self.parser.error(str(_root_cause(error)))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The data and the model exist now: a linked setting given on its own would be replaced silently.
        _refuse_replaced_links(self.parser, LINKS, getattr(self, "_linked_given", {}), self.datamodule)
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        # A bad setting found in setup (STF reference_size < batch, curriculum clusters > timesteps,
        # a checkpoint of another model, a net that does not fit the data) is one sentence too, as
        # long as no step ran; divergence is one sentence naming the step (exit status 1).
        try:
            with _quiet(_EVAL_WARNINGS if subcommand != "fit" else ()):
                super()._run_subcommand(subcommand)
        except ValueError as error:
            if _any_step_ran(self.trainer):
                raise
            _remove_empty_log_dir(self.trainer)
            if self.trainer.global_rank:
                sys.exit(2)  # every rank refuses the same setting; global rank 0 says why
            self.parser.error(str(_root_cause(error)))
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)


class SaveConfigAfterSetup(SaveConfigCallback):
    """Writes ``config.yaml`` once setup passed (at fit/validate/test/predict start), not in ``setup``.

    A setting refused during setup (or a ``--ckpt_path`` of another model) leaves no file behind.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass  # see _save

    def _save(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, str(trainer.state.fn))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module)


def _default_callbacks(trainer: Namespace) -> list[Any]:
    """The step progress bar and model summary unless disabled or chosen, and the callbacks every run has."""
    callbacks = list(trainer.callbacks or [])
    names = {getattr(c, "class_path", type(c).__name__).rsplit(".", 1)[-1] for c in callbacks}
    if trainer.enable_progress_bar is not False and not names & {"RichProgressBar", "TQDMProgressBar",
                                                                   "StepProgressBar"}:
        callbacks.append(Namespace(class_path="lightning_diffusion.cli_output.StepProgressBar"))
    if trainer.enable_model_summary is not False and not names & {"RichModelSummary", "ModelSummary",
                                                                    "SummaryWithoutZeroFlops"}:
        callbacks.append(Namespace(class_path="lightning_diffusion.cli_output.SummaryWithoutZeroFlops",
                                   init_args=Namespace(max_depth=1)))
    if "PreemptionCheckpoint" not in names:
        callbacks.append(Namespace(class_path="lightning_diffusion.callbacks.PreemptionCheckpoint"))
    if trainer.enable_checkpointing is not False:
        # last.ckpt at the end of every fit and every 30 minutes (a recipe sets every_n_steps); the
        # after-validation ModelCheckpoint stays (Lightning adds its own only when no Checkpoint is
        # given) and comes first, so trainer.checkpoint_callback is it even when a recipe names LastCheckpoint.
        if "ModelCheckpoint" not in names:
            callbacks.insert(0, Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint"))
        if "LastCheckpoint" not in names and not any(_saves_last(c) for c in callbacks):
            callbacks.append(Namespace(class_path="lightning_diffusion.callbacks.LastCheckpoint"))
    if "SampleGrid" not in names:
        # predict writes PNG grids, fit writes one after each validation and at its end
        callbacks.append(Namespace(class_path="lightning_diffusion.callbacks.SampleGrid"))
    if "FinalTrainLoss" not in names:
        callbacks.append(Namespace(class_path="lightning_diffusion.cli_output.FinalTrainLoss"))
    return callbacks


def _default_logger(trainer: Namespace, subcommand: str | None, ckpt_path: Any) -> None:
    """TensorBoard + metrics.csv unless the user chose a logger; evaluation of a run's checkpoint goes beside it."""
    logger = trainer.logger
    ours = isinstance(logger, Namespace) and logger.get("class_path", "").endswith(".TensorBoardCSVLogger")
    if logger not in (None, True) and not ours:
        return
    if not ours:
        # Lightning's default TensorBoardLogger's folder: <default_root_dir>/lightning_logs/version_N (SLURM: job id)
        logger = trainer.logger = Namespace(
            class_path="lightning_diffusion.cli_output.TensorBoardCSVLogger",
            init_args=Namespace(save_dir=str(trainer.default_root_dir or os.getcwd()), name="lightning_logs",
                                version=SLURMEnvironment.job_id(), sub_dir=None))
    if subcommand not in (None, "fit") and isinstance(ckpt_path, (str, os.PathLike)) and os.path.exists(ckpt_path):
        folder = Path(os.path.abspath(ckpt_path)).parent
        run = folder.parent if folder.name == "checkpoints" else folder  # <run>/checkpoints/x.ckpt -> <run>
        logger.init_args.update(Namespace(save_dir=str(run.parent), name="", version=run.name, sub_dir=subcommand))


def _checkpoint_io_configured(trainer: Namespace) -> bool:
    """Whether the user chose a CheckpointIO (in ``trainer.plugins`` or the strategy's ``checkpoint_io``)."""
    plugins = trainer.plugins if isinstance(trainer.plugins, list) else [trainer.plugins]
    strategy = trainer.strategy
    if isinstance(strategy, Namespace) and (strategy.get("init_args") or {}).get("checkpoint_io") is not None:
        return True
    if getattr(strategy, "_checkpoint_io", None) is not None:
        return True
    for plugin in plugins:
        if isinstance(plugin, Namespace):
            module, _, name = plugin.class_path.rpartition(".")
            plugin = getattr(importlib.import_module(module), name, None)
        if isinstance(plugin, CheckpointIO) or (isinstance(plugin, type) and issubclass(plugin, CheckpointIO)):
            return True
    return False


def _saves_last(callback: Any) -> bool:
    """Whether a configured callback already writes ``last.ckpt`` (a ModelCheckpoint with ``save_last``)."""
    if isinstance(callback, Namespace):
        return bool((callback.get("init_args") or {}).get("save_last"))
    return bool(getattr(callback, "save_last", False))


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lightning-diffusion`` (returns nothing: the exit status stays 0).

    ``lightning-diffusion encode ...`` turns images into latent shards (:mod:`lightning_diffusion.encode`);
    every other subcommand is Lightning's (fit, validate, test, predict).
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["encode"]:
        from .encode import main as encode_main

        encode_main(argv[1:])
        return
    DiffusionCLI(args=args)
