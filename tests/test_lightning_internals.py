"""Private Lightning (and torch) names the library overrides or reads: each fails here, by name, if it goes.

A rename upstream would otherwise show up as a silent behaviour change (an override never called,
a ``getattr(..., default)`` that always returns the default). Each test is marked with the name it
pins and the library file that depends on it; any failure inside it (a missing attribute or import,
a changed signature, a call site gone) is reported with both. ``setup.cfg`` bounds Lightning to the
minor series these pass on; docs/callbacks.md ("Lightning internals the library relies on") lists them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from conftest import quiet_trainer
from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.cli_errors import _any_step_ran
from lightning_diffusion.cli_output import StepProgressBar, _AppendingCSV
from lightning_diffusion.data.resumable import ImagesSeenSampler, ResumableDataLoader
from lightning_diffusion.divergence import last_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def relies_on(name: str, user: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Report any failure of the test as "``name`` changed; ``user`` depends on it"."""
    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(test)  # keeps the signature: pytest still sees the fixtures and parameters
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                test(*args, **kwargs)
            except (AssertionError, AttributeError, ImportError, KeyError, TypeError, ValueError) as error:
                pytest.fail(f"Lightning (or torch) renamed or changed {name}; {user}. Update that code, then the "
                            f"lightning bound in setup.cfg. ({type(error).__name__}: {error})")
        return run
    return wrap


def _params(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def _loader(batches: int = 4) -> ResumableDataLoader:
    dataset = RandomDataset(32, 2 * batches)
    return ResumableDataLoader(dataset, batch_size=2, sampler=ImagesSeenSampler(dataset, 2), drop_last=True)


# ---------------------------------------------------------------- LightningCLI (cli.py, cli_errors.py)
@relies_on("LightningCLI._parse_ckpt_path", "lightning_diffusion/cli.py DiffusionCLI overrides it with a no-op so "
           "the run's config, not the checkpoint's hyperparameters, decides")
def test_cli_parse_ckpt_path_is_still_called():
    assert _params(LightningCLI._parse_ckpt_path) == ["self"]
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)
    assert DiffusionCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


@relies_on("LightningCLI._run_subcommand", "lightning_diffusion/cli.py DiffusionCLI overrides it to report setup "
           "errors and divergence as one error line")
def test_cli_run_subcommand_is_still_called():
    assert _params(LightningCLI._run_subcommand) == ["self", "subcommand"]
    assert "self._run_subcommand(self.subcommand)" in inspect.getsource(LightningCLI.__init__)


@relies_on("ArgumentParser._actions", "lightning_diffusion/cli_errors.py _one_line reads it to suggest the closest "
           "key for a typo")
def test_argument_parser_lists_its_actions():
    actions = LightningArgumentParser()._actions
    assert actions and all(hasattr(action, "dest") for action in actions)


# ---------------------------------------------------------------- Rich bar and summary (cli_output.py)
@pytest.mark.parametrize(("name", "params"), [
    ("_get_train_description", ["self", "current_epoch"]),
    ("_initialize_train_progress_bar_id", ["self"]),
    ("_update", ["self", "progress_bar_id", "current", "visible", "hard"]),
    ("_update_metrics", ["self", "trainer", "pl_module"]),
])
@relies_on("RichProgressBar's private methods", "lightning_diffusion/cli_output.py StepProgressBar overrides "
           "_get_train_description and calls the others")
def test_rich_progress_bar_private_methods(name, params):
    assert _params(getattr(RichProgressBar, name)) == params


@relies_on("RichProgressBar.train_progress_bar_id and the train bar's hooks", "lightning_diffusion/cli_output.py "
           "StepProgressBar keeps one bar over max_steps through them")
def test_step_progress_bar_counts_optimizer_steps(tmp_path):
    seen = []

    class Probe(pl.Callback):  # runs after the bar: reads what it shows
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            bar = trainer.progress_bar_callback
            task = bar.progress.tasks[bar.train_progress_bar_id]
            seen.append((task.description.strip(), task.total, task.completed))

    assert RichProgressBar().train_progress_bar_id is None
    trainer = quiet_trainer(max_steps=3, max_epochs=-1, limit_val_batches=0, enable_progress_bar=True,
                            callbacks=[StepProgressBar(), Probe()], default_root_dir=tmp_path)
    trainer.fit(BoringModel(), train_dataloaders=_loader(batches=2))  # 3 steps cross an epoch end
    assert seen == [("step", 3, 1), ("step", 3, 2), ("step", 3, 3)]


@relies_on("ModelSummary.summarize", "lightning_diffusion/cli_output.py SummaryWithoutZeroFlops overrides it")
def test_model_summary_still_calls_summarize_with_flops():
    assert _params(RichModelSummary.summarize) == ["summary_data", "total_parameters", "trainable_parameters",
                                                   "model_size", "total_training_modes", "total_flops",
                                                   "summarize_kwargs"]
    assert "total_flops=total_flops" in inspect.getsource(ModelSummary.on_fit_start)


# ---------------------------------------------------------------- loggers (cli_output.py)
@relies_on("TensorBoardLogger._experiment", "lightning_diffusion/cli_output.py TensorBoardCSVLogger reads and clears "
           "it to discard the event file of a refused start")
def test_tensorboard_logger_keeps_its_writer_in_experiment(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    assert logger._experiment is None
    assert logger.experiment is logger._experiment


@relies_on("ExperimentWriter._check_log_dir_exists", "lightning_diffusion/cli_output.py _AppendingCSV overrides it "
           "(with _fs, metrics_file_path, metrics_keys) to keep the rows of an existing metrics.csv")
def test_csv_writer_checks_its_folder_through_a_method(tmp_path):
    assert _params(ExperimentWriter._check_log_dir_exists) == ["self"]
    inits = [inspect.getsource(c.__init__) for c in ExperimentWriter.__mro__[:-1] if "__init__" in vars(c)]
    assert any("self._check_log_dir_exists()" in source for source in inits)
    first = ExperimentWriter(str(tmp_path))
    assert {"_fs", "metrics_file_path", "metrics_keys"} <= set(vars(first))
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    again = _AppendingCSV(str(tmp_path))
    again.log_metrics({"a": 2.0}, step=1)
    again.save()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["a,step", "1.0,0", "2.0,1"]


# ---------------------------------------------------------------- loops, trainer, module
@relies_on("<loop>.batch_progress.total.ready", "lightning_diffusion/cli_errors.py _any_step_ran reads it (a "
           "ValueError before any batch is a bad setting, after one a bug)")
def test_loops_count_started_batches(tmp_path):
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, val_check_interval=1, default_root_dir=tmp_path)
    assert not _any_step_ran(trainer)
    trainer.fit(BoringModel(), train_dataloaders=_loader(), val_dataloaders=_loader())
    assert trainer.fit_loop.epoch_loop.batch_progress.total.ready == 2
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.ready >= 1
    assert [loop.batch_progress.total.ready for loop in (trainer.validate_loop, trainer.test_loop,
                                                          trainer.predict_loop)] == [0, 0, 0]
    assert _any_step_ran(trainer)


@relies_on("ModelCheckpoint._last_checkpoint_saved", "lightning_diffusion/divergence.py last_checkpoint() reads it "
           "to name the last good checkpoint (callbacks/last_checkpoint.py sets the same name)")
def test_model_checkpoint_remembers_its_last_save(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints")
    assert checkpoint._last_checkpoint_saved == ""
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[checkpoint],
                            default_root_dir=tmp_path)
    trainer.fit(BoringModel(), train_dataloaders=_loader())
    assert checkpoint._last_checkpoint_saved.endswith("step=2.ckpt")
    assert last_checkpoint(trainer) == repr(checkpoint._last_checkpoint_saved)


@relies_on("ModelCheckpoint._find_last_checkpoints", "ckpt_path='last' finds the last.ckpt of "
           "lightning_diffusion/callbacks/last_checkpoint.py only through the ModelCheckpoint beside it")
def test_ckpt_path_last_searches_model_checkpoint_folders():
    from lightning.pytorch.trainer.connectors import checkpoint_connector
    assert _params(ModelCheckpoint._find_last_checkpoints) == ["self", "trainer"]
    assert "_find_last_checkpoints(self.trainer)" in inspect.getsource(checkpoint_connector)


@relies_on("LightningModule._trainer", "lightning_diffusion/module.py and divergence.py read it to tell an attached "
           "module from a bare one (.trainer raises when unattached)")
def test_module_trainer_reference_is_readable_unattached():
    module = BoringModel()
    assert module._trainer is None
    trainer = quiet_trainer()
    module.trainer = trainer
    assert module._trainer is trainer


@relies_on("Strategy._checkpoint_io", "lightning_diffusion/cli.py _checkpoint_io_configured reads it to leave a "
           "chosen CheckpointIO in place of AtomicCheckpointIO")
def test_strategy_keeps_a_chosen_checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy
    assert SingleDeviceStrategy("cpu")._checkpoint_io is None
    chosen = TorchCheckpointIO()
    assert SingleDeviceStrategy("cpu", checkpoint_io=chosen)._checkpoint_io is chosen


@relies_on("Trainer.precision_plugin.forward_context", "lightning_diffusion/callbacks/adaptive_timesteps.py runs "
           "its look-ahead losses inside it")
def test_precision_plugin_forward_context():
    with quiet_trainer().precision_plugin.forward_context():
        assert torch.is_grad_enabled()


@relies_on("lightning.pytorch.utilities.data.extract_batch_size", "lightning_diffusion/clock.py counts images with it")
def test_extract_batch_size():
    from lightning.pytorch.utilities.data import extract_batch_size
    assert _params(extract_batch_size) == ["batch"]
    assert extract_batch_size((torch.zeros(4, 1, 2, 2), torch.zeros(4))) == 4


@relies_on("the stateful dataloader protocol (_Stateful, fit_loop._combined_loader._state_dicts, the checkpoint's "
           "'combined_loader')", "lightning_diffusion/data/resumable.py saves the data position through it, and "
           "tests/digest_callback.py reads fit_loop._combined_loader._state_dicts()")
def test_stateful_dataloader_protocol(tmp_path):
    from lightning.fabric.utilities.types import _Stateful
    loader = _loader()
    assert isinstance(loader, _Stateful)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(BoringModel(), train_dataloaders=loader)
    assert trainer.fit_loop._combined_loader._state_dicts() == [loader.state_dict()]
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    saved = torch.load(tmp_path / "x.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert saved["combined_loader"] == [loader.state_dict()] and loader.state_dict()["batches_seen"] == 3


@relies_on("lightning.fabric.utilities.types._PATH", "lightning_diffusion/checkpoint_io.py imports it")
def test_path_type_alias():
    from lightning.fabric.utilities.types import _PATH
    assert _PATH is not None


# ---------------------------------------------------------------- signals (preemption.py, tests/conftest.py)
@relies_on("trainer.call._call_and_handle_interrupt", "tests/conftest.py guards SIGINT because Lightning sets it to "
           "SIG_IGN there on a KeyboardInterrupt")
def test_keyboard_interrupt_handling_ignores_further_ctrl_c():
    from lightning.pytorch.trainer import call
    assert _params(call._call_and_handle_interrupt) == ["trainer", "trainer_fn", "args", "kwargs"]
    assert "signal.signal(signal.SIGINT, signal.SIG_IGN)" in inspect.getsource(call._call_and_handle_interrupt)
    assert "call._call_and_handle_interrupt(" in inspect.getsource(pl.Trainer.fit)


@relies_on("Trainer._run's _signal_connector.register_signal_handlers()", "lightning_diffusion/callbacks/"
           "preemption.py installs its handlers in on_train_start, after Lightning's, and exits with SIGTERMException")
def test_signal_handlers_are_registered_before_training_starts():
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    source = inspect.getsource(pl.Trainer._run)
    assert "self._signal_connector.register_signal_handlers()" in source
    assert source.index("register_signal_handlers") < source.index("self._run_stage()")
    assert issubclass(SIGTERMException, SystemExit)


# ---------------------------------------------------------------- torch and torchmetrics
@relies_on("nn.Module._compiled_call_impl", "lightning_diffusion/module.py reads it to compile the net once")
def test_module_compiled_call_impl():
    assert torch.nn.Linear(1, 1)._compiled_call_impl is None
    assert "self._compiled_call_impl =" in inspect.getsource(torch.nn.Module.compile)


@relies_on("torch._foreach_lerp_ / torch._foreach_copy_", "lightning_diffusion/ema/power_ema.py averages with them")
def test_foreach_lerp_and_copy():
    average, source = [torch.zeros(2)], [torch.ones(2)]
    torch._foreach_lerp_(average, source, 0.25)
    assert torch.equal(average[0], torch.full((2,), 0.25))
    torch._foreach_copy_(average, source)
    assert torch.equal(average[0], source[0])


@relies_on("LRScheduler._last_lr", "lightning_diffusion/optim.py reapply_settings writes it so get_last_lr() "
           "shows the re-applied rate")
def test_lr_scheduler_last_lr_is_what_get_last_lr_returns():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    scheduler._last_lr[0] = 0.5
    assert scheduler.get_last_lr() == [0.5]


@relies_on("torchmetrics Metric._apply", "lightning_diffusion/metrics/fd.py FrechetDistance overrides it to move its "
           "feature net along")
def test_metric_apply_signature():
    from torchmetrics import Metric
    assert _params(Metric._apply) == ["self", "fn", "exclude_state"]
    assert _params(torch.nn.Module._apply)[:2] == ["self", "fn"]
