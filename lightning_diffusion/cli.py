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
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import importlib
import inspect
import logging
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from rich import get_console
from rich.table import Table

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
# Lightning's messages that say nothing about this run (matched exactly, nothing else is hidden).
_QUIET_LOGS = re.compile(r"💡 Tip: For seamless cloud (logging|uploads)|Skipping setting a default `ModelSummary`")
_QUIET_WARNINGS = (  # (message regex, category)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),  # inside Lightning, torch >= 2.10
    # The module logs on global steps, across epoch ends: logs come, however short the epoch.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", PossibleUserWarning),
)
# validate/test/predict restore the ModelCheckpoint state of a fit that wrote elsewhere; they save nothing.
_EVAL_WARNINGS = ((r"The dirpath has changed from ", UserWarning),)
_CKPT_NAMES = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself


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
        for source, target in LINKS:
            attribute = source.split(".", 1)[1]
            given, linked = getattr(self, "_linked_given", {}).get(target), getattr(self.datamodule, attribute, None)
            if given is not None and linked is not None and given != linked:
                self.parser.error(f"{target}={given} is linked from {source} (here {linked}), which replaces it; "
                                  f"set --data.init_args.{attribute}={given} instead")
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
            self.parser.error(str(_root_cause(error)))
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad setting as one ``error:`` line (exit status 2), not jsonargparse's usage and error tree.

    An unknown key names the key and the closest accepted ones (``gama`` -> ``gamma``).
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser: its caller reports
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {_one_line(message, parser)}\n")
        self.exit(2)


def _one_line(message: str, parser: LightningArgumentParser) -> str:
    """jsonargparse's nested "Does not validate against any of the Union subtypes" tree as one sentence."""
    unknown = re.search(r"Subcommand '\w+' does not accept option '([^']+)'", message) or \
        re.search(r"^[Uu]nrecognized arguments: --([\w.]+)", message)
    if unknown:
        keys = [a.dest for a in parser._actions if a.dest and not a.dest.startswith("_")]
        return _unknown_key(unknown[1], keys, f"not a setting of {parser.prog.split()[-1]}")
    lines = message.splitlines()
    option = next((i for i, line in enumerate(lines) if re.search(r"Option '[^']+' is not accepted", line)), None)
    if option is None:
        keys = re.findall(r'Parser key "([^"]+)"', message)
        details = [line.strip(" -") for line in lines[1:] if line.strip() and not re.match(
            r"\s*(- )?(Does not validate|Subtypes:|Errors:|Expected a <class 'NoneType'>|Given value|Problem with)",
            line)]
        if keys and details:  # e.g. 'trainer.max_steps: expected a <class 'int'>, got value: abc'
            return f"{'.'.join(keys)}: {details[0][0].lower()}{details[0][1:].replace('. Got', ', got')}"
        return " ".join(s.strip() for s in lines)
    name = re.search(r"Option '([^']+)'", lines[option])[1]
    path, class_path, indent = [name], None, _indent(lines[option])
    for line in reversed(lines[:option]):  # the nesting above the unknown option, innermost first
        if _indent(line) >= indent:
            continue
        indent = _indent(line)
        if m := re.search(r"Problem with given class_path '([^']+)'", line):
            class_path = class_path or m[1]
            path.insert(0, "init_args")
        elif m := re.search(r'Parser key "([^"]+)"', line):
            path.insert(0, m[1])
    cls = _import(class_path) if class_path else None
    accepted = [p.name for p in inspect.signature(cls).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)] if cls else []
    return _unknown_key(".".join(path), accepted, f"{cls.__name__} has no setting {name!r}" if cls else "unknown")


def _unknown_key(key: str, accepted: list[str], why: str) -> str:
    parent, _, leaf = key.rpartition(".")
    siblings = {a.rpartition(".")[2]: a for a in accepted if "." in a and a.rpartition(".")[0] == parent} or \
        {a: a for a in accepted}  # trainer.max_stepz among trainer.*; gama among a class's parameters
    close = [siblings[c] for c in difflib.get_close_matches(leaf, siblings, n=3)]
    hint = f"did you mean {' or '.join(close)}?" if close else \
        f"the accepted names are {', '.join(sorted(accepted))}" if 0 < len(accepted) <= 20 else "see --help"
    return f"{key}: {why}; {hint}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _explicit_value(config: Namespace, key: str) -> Any:
    """The value of a linked target when it differs from its class's default (None: not set)."""
    value = config.get(key)
    owner = config.get(key.rsplit(".init_args.", 1)[0] + ".class_path")
    cls = _import(owner) if isinstance(owner, str) else None
    if value is None or cls is None:
        return None
    parameter = inspect.signature(cls).parameters.get(key.rsplit(".", 1)[-1])
    return None if parameter is None or parameter.default == value else value


def _check_ckpt_path(ckpt_path: Any, parser: LightningArgumentParser) -> None:
    """A missing, truncated or code-carrying ``--ckpt_path`` is one sentence, before anything is written.

    The file is read as Lightning will read it (``weights_only=True``), memory-mapped, so only its
    pickle is parsed here: tensors and plain Python data load; anything that would import or run
    code is refused.
    """
    if not isinstance(ckpt_path, (str, os.PathLike)) or str(ckpt_path) in _CKPT_NAMES or "://" in str(ckpt_path) \
            or str(ckpt_path).startswith("registry"):
        return
    if not os.path.isfile(ckpt_path):
        parser.error(f"--ckpt_path: '{ckpt_path}' is not a file; give a checkpoint that fit wrote, "
                     f"e.g. <run>/checkpoints/last.ckpt")
    try:
        torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - whatever torch says, the answer is the same sentence
        why = "it holds objects other than tensors and plain data, and loading them could run code from the file" \
            if isinstance(error, pickle.UnpicklingError) else "it is truncated or not a PyTorch checkpoint"
        parser.error(f"--ckpt_path: '{ckpt_path}' cannot be read as a checkpoint ({why}); "
                     f"use a checkpoint that fit wrote")


def _default_callbacks(trainer: Namespace) -> list[Any]:
    """The step progress bar and model summary unless disabled or chosen, and the callbacks every run has."""
    callbacks = list(trainer.callbacks or [])
    names = {getattr(c, "class_path", type(c).__name__).rsplit(".", 1)[-1] for c in callbacks}
    if trainer.enable_progress_bar is not False and not names & {"RichProgressBar", "TQDMProgressBar",
                                                                   "StepProgressBar"}:
        callbacks.append(Namespace(class_path="lightning_diffusion.cli.StepProgressBar"))
    if trainer.enable_model_summary is not False and not names & {"RichModelSummary", "ModelSummary",
                                                                    "SummaryWithoutZeroFlops"}:
        callbacks.append(Namespace(class_path="lightning_diffusion.cli.SummaryWithoutZeroFlops",
                                   init_args=Namespace(max_depth=1)))
    if "PreemptionCheckpoint" not in names:
        callbacks.append(Namespace(class_path="lightning_diffusion.callbacks.PreemptionCheckpoint"))
    if trainer.enable_checkpointing is not False and "LastCheckpoint" not in names:
        # last.ckpt at the end of every fit and every 30 minutes (a recipe sets every_n_steps); the
        # after-validation ModelCheckpoint stays, which Lightning adds only when no Checkpoint is given.
        if "ModelCheckpoint" not in names:
            callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint"))
        if not any(_saves_last(c) for c in callbacks):
            callbacks.append(Namespace(class_path="lightning_diffusion.callbacks.LastCheckpoint"))
    if "SampleGrid" not in names:
        # predict writes PNG grids, fit writes one after each validation and at its end
        callbacks.append(Namespace(class_path="lightning_diffusion.callbacks.SampleGrid"))
    if "FinalTrainLoss" not in names:
        callbacks.append(Namespace(class_path="lightning_diffusion.cli.FinalTrainLoss"))
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
            class_path="lightning_diffusion.cli.TensorBoardCSVLogger",
            init_args=Namespace(save_dir=str(trainer.default_root_dir or os.getcwd()), name="lightning_logs",
                                version=SLURMEnvironment.job_id(), sub_dir=None))
    if subcommand not in (None, "fit") and isinstance(ckpt_path, (str, os.PathLike)) and os.path.isfile(ckpt_path):
        folder = Path(os.path.abspath(ckpt_path)).parent
        run = folder.parent if folder.name == "checkpoints" else folder  # <run>/checkpoints/x.ckpt -> <run>
        logger.init_args.update(Namespace(save_dir=str(run.parent), name="", version=run.name, sub_dir=subcommand))


@contextlib.contextmanager
def _quiet(warning_filters: tuple[tuple[str, type[Warning]], ...], log_pattern: re.Pattern[str] | None = None
           ) -> Iterator[None]:
    """Hide the warnings listed and Lightning's log lines matching ``log_pattern``, by message, while inside."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero",
                                              "lightning.fabric.utilities.rank_zero")] if log_pattern else []
    quiet = _MessageFilter(log_pattern) if log_pattern else None
    with warnings.catch_warnings():
        for message, category in warning_filters:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.addFilter(quiet)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(quiet)


class _MessageFilter(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


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


class StepProgressBar(RichProgressBar):
    """Rich progress bar that counts optimizer steps of ``max_steps`` (``step ━━━ 40/2000``) when the fit is
    bounded by steps, not epochs; by epochs it is Lightning's. Shows the logged losses, not ``v_num``.
    """

    def _by_steps(self) -> bool:
        return self.trainer.max_epochs == -1 and (self.trainer.max_steps or 0) > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{'step':{len(self.validation_description)}}"  # padded as Lightning pads "Epoch N"

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._by_steps() or self.train_progress_bar_id is None:
            super().on_train_epoch_start(trainer, pl_module)  # creates the bar; by steps it is never reset

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class SummaryWithoutZeroFlops(RichModelSummary):
    """Lightning's Rich model summary without the FLOPs column and line while they are 0 (they are
    counted only for a module with ``example_input_array``, which the diffusion module does not set)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        if total_flops:
            return RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                              total_training_modes, total_flops, **summarize_kwargs)
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, style="dim" if name == " " else None,
                             justify="right" if name in ("Params", "Params per Device", "In sizes", "Out sizes")
                             else "left", no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (("Trainable params", get_human_readable_count(int(trainable_parameters))),
                             ("Non-trainable params", get_human_readable_count(int(total_parameters -
                                                                                   trainable_parameters))),
                             ("Total params", get_human_readable_count(int(total_parameters))),
                             ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                             ("Modules in train mode", total_training_modes["train"]),
                             ("Modules in eval mode", total_training_modes["eval"])):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)


class FinalTrainLoss(Callback):
    """Log ``train/loss`` of the last step when the fit ends and no ``train/loss`` was logged yet.

    The module logs every ``log_every_n_steps`` steps only, so a fit shorter than that left no
    training row in ``metrics.csv`` (nor in TensorBoard). Keeps a reference to each step's loss
    (no host sync); reads it once, at the end.
    """

    def __init__(self) -> None:
        self._loss: torch.Tensor | None = None
        self._epoch = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss, self._epoch = loss, trainer.current_epoch  # Lightning divided it by accumulate_grad_batches

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._loss is None or "train/loss" in trainer.logged_metrics:
            return
        row = {"train/loss": float(self._loss) * trainer.accumulate_grad_batches, "epoch": self._epoch}
        for logger in trainer.loggers:
            logger.log_metrics(row, step=max(trainer.global_step - 1, 0))  # Lightning's step column: global_step - 1
            logger.save()
        self._loss = None


class TensorBoardCSVLogger(TensorBoardLogger):
    """TensorBoard event files and ``metrics.csv`` in one folder: the CLI's default logger.

    Scalars go to both; images and histograms (``logger.experiment.add_image``/``add_histogram``) to
    TensorBoard. ``metrics.csv`` keeps the rows already in it (a run continued in the same folder
    appends). Open TensorBoard with ``tensorboard --logdir <save_dir>``.

    Args:
        save_dir: root folder, e.g. the trainer's ``default_root_dir``.
        name: experiment folder below it.
        version: ``version_N`` folder (None: the next free N), or a folder name.
        sub_dir: folder below the version folder (``validate`` of a run's checkpoint writes there).

    Example::

        pl.Trainer(logger=TensorBoardCSVLogger("outputs"))  # outputs/lightning_logs/version_0/{events.*,metrics.csv}
    """

    def __init__(self, save_dir: str, name: str = "lightning_logs", version: int | str | None = None,
                 sub_dir: str | None = None) -> None:
        super().__init__(save_dir, name=name, version=version, sub_dir=sub_dir, default_hp_metric=False)
        self._csv: _AppendingCSV | None = None
        self._created: list[str] = []

    @property
    def experiment(self) -> Any:
        if self._experiment is None and rank_zero_only.rank == 0:
            before = set(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else set()
            super().experiment  # noqa: B018 - creates the SummaryWriter, which writes its file at once
            self._created = sorted(set(os.listdir(self.log_dir)) - before)
        return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        if self._csv is None:
            self._csv = _AppendingCSV(self.log_dir)
        self._csv.log_metrics(metrics, step)

    @rank_zero_only
    def save(self) -> None:
        super().save()
        if self._csv is not None:
            self._csv.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._csv is not None:
            self._csv.save()
        super().finalize(status)

    @rank_zero_only
    def discard(self) -> None:
        """Close the writer and delete the files it created (a start refused before any step)."""
        if self._experiment is not None:
            self._experiment.close()
            self._experiment = None
        for name in self._created:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.log_dir, name))
        self._created = []


class _AppendingCSV(ExperimentWriter):
    """Lightning's ``metrics.csv`` writer, keeping the rows already in the file instead of deleting them."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


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


def _any_step_ran(trainer: Trainer | None) -> bool:
    """Whether any training/evaluation batch started (then a ValueError is a bug: keep its traceback)."""
    if trainer is None:
        return False
    loops: list[Any] = [trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop,
                        trainer.test_loop, trainer.predict_loop]
    return any(loop.batch_progress.total.ready for loop in loops)


def _remove_empty_log_dir(trainer: Trainer | None) -> None:
    """Loggers create their version folder in setup; a refused start removes it again if empty."""
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer is not None else None
    if not log_dir or not trainer.is_global_zero:  # logger.log_dir: no collective, unlike trainer.log_dir
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardCSVLogger):
            logger.discard()  # its event file, written when setup created the writer
    folder = log_dir
    for _ in range(2):  # version_N, then lightning_logs
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception: jsonargparse wraps ours in "Does not validate against ..." layers."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return error


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lightning-diffusion`` (returns nothing: the exit status stays 0)."""
    DiffusionCLI(args=args)
