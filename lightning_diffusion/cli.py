"""Command line: ``lightning-diffusion fit|validate|test|predict --config configs/<recipe>.yaml``.

A :class:`LightningCLI` in subclass mode for both the model and the data. The data's shape is
stated once: ``data.channels``, ``data.image_size`` and ``data.num_classes`` are linked into the
network's ``in_channels``, ``image_size`` and ``num_classes`` and the module's ``num_classes``.
Rich progress bar and model summary are on by default; the config is saved next to the logs by
global rank 0 only.
"""

from __future__ import annotations


from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .data.base import ImageDataModule
from .module import DiffusionLightningModule

__all__ = ["DiffusionCLI", "main"]


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
        kwargs.setdefault("save_config_callback", SaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # State the data's shape once: the network and the module follow the DataModule.
        for source, target in (
            ("data.channels", "model.init_args.net.init_args.in_channels"),
            ("data.image_size", "model.init_args.net.init_args.image_size"),
            ("data.num_classes", "model.init_args.net.init_args.num_classes"),
            ("data.num_classes", "model.init_args.num_classes"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # Rich progress bar and model summary unless the user disabled them or chose others,
        # and a SampleGrid so every run leaves pictures.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        callbacks = list(trainer.callbacks or [])
        names = {getattr(c, "class_path", type(c).__name__).rsplit(".", 1)[-1] for c in callbacks}
        if trainer.enable_progress_bar is not False and not names & {"RichProgressBar", "TQDMProgressBar"}:
            callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.RichProgressBar"))
        if trainer.enable_model_summary is not False and not names & {"RichModelSummary", "ModelSummary"}:
            callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.RichModelSummary",
                                       init_args=Namespace(max_depth=1)))
        if "SampleGrid" not in names:
            # predict writes PNG grids, fit writes one after each validation
            callbacks.append(Namespace(class_path="lightning_diffusion.callbacks.SampleGrid"))
        trainer.callbacks = callbacks

    def instantiate_classes(self) -> None:
        # A bad setting (missing data path, image size the network cannot take, gamma <= 0, ...)
        # is reported as the one sentence that names it, not as a stack trace.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:
            self.parser.error(str(_root_cause(error)))


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
