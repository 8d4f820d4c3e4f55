"""What the CLI shows and writes while a run goes: progress bar, model summary, logs, filters.

* :class:`StepProgressBar`: Rich's progress bar counting optimizer steps (``step`` N/max_steps).
* :class:`SummaryWithoutZeroFlops`: Rich's model summary without a FLOPs column of zeros.
* :class:`FinalTrainLoss`: at least one ``train/loss`` row, however short the fit.
* :class:`TensorBoardCSVLogger`: TensorBoard event files and ``metrics.csv`` in one folder.
* ``_quiet``: hides, by exact message, Lightning's warnings and log lines that say nothing about the run.

:mod:`lightning_diffusion.cli` adds them as defaults (class paths ``lightning_diffusion.cli.<Name>``
keep working: ``cli`` re-exports them for configs saved before this module existed).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import warnings
from typing import Any, Iterator

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from rich import get_console
from rich.table import Table

__all__ = ["FinalTrainLoss", "StepProgressBar", "SummaryWithoutZeroFlops", "TensorBoardCSVLogger"]

# Lightning's messages that say nothing about this run (matched exactly, nothing else is hidden).
_QUIET_LOGS = re.compile(r"💡 Tip: For seamless cloud (logging|uploads)|Skipping setting a default `ModelSummary`")
_QUIET_WARNINGS = (  # (message regex, category)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),  # inside Lightning, torch >= 2.10
    # The module logs on global steps, across epoch ends: logs come, however short the epoch.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", PossibleUserWarning),
)
# validate/test/predict restore the ModelCheckpoint state of a fit that wrote elsewhere; they save nothing.
_EVAL_WARNINGS = ((r"The dirpath has changed from ", UserWarning),)


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

