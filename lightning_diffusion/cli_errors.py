"""How the CLI refuses a bad setting: one ``error:`` line and exit status 2, nothing written.

* :class:`OneLineErrorParser`: jsonargparse's usage and nested error tree as one sentence; an
  unknown key names the closest accepted ones (``gama`` -> ``gamma``).
* ``_explicit_value`` / ``_refuse_replaced_links``: a linked setting (``data.channels`` ->
  ``...net.init_args.in_channels``) given on its own, which the link would replace silently.
* ``_check_ckpt_path``: a missing, truncated or code-carrying ``--ckpt_path``, before anything is written.
* ``_root_cause``, ``_any_step_ran``, ``_remove_empty_log_dir``: a ``ValueError`` raised before any
  step is a bad setting (its innermost message, and the empty log folder removed); after one, a bug.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import re
import sys
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from .cli_output import TensorBoardCSVLogger
from .sharded_checkpoint import META, is_sharded_checkpoint

__all__ = ["OneLineErrorParser"]

_CKPT_NAMES = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself


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


def _refuse_replaced_links(parser: LightningArgumentParser, links: tuple[tuple[str, str], ...],
                           given: dict[str, Any], datamodule: Any) -> None:
    """A linked setting given on its own (``given``: target -> value) that the data's value would replace."""
    for source, target in links:
        attribute = source.split(".", 1)[1]
        value, linked = given.get(target), getattr(datamodule, attribute, None)
        if value is not None and linked is not None and value != linked:
            parser.error(f"{target}={value} is linked from {source} (here {linked}), which replaces it; "
                         f"set --data.init_args.{attribute}={value} instead")


def _check_ckpt_path(ckpt_path: Any, parser: LightningArgumentParser) -> None:
    """A missing, truncated or code-carrying ``--ckpt_path`` is one sentence, before anything is written.

    The file is read as Lightning will read it (``weights_only=True``), memory-mapped, so only its
    pickle is parsed here: tensors and plain Python data load; anything that would import or run
    code is refused.
    """
    if not isinstance(ckpt_path, (str, os.PathLike)) or str(ckpt_path) in _CKPT_NAMES or "://" in str(ckpt_path) \
            or str(ckpt_path).startswith("registry"):
        return
    if is_sharded_checkpoint(ckpt_path):  # FSDP2's folder: rank 0's meta.pt holds the plain data
        if not os.path.isfile(os.path.join(ckpt_path, META)):
            parser.error(f"--ckpt_path: '{ckpt_path}' is a sharded checkpoint folder without its {META}: it is "
                         f"incomplete; use another checkpoint that fit wrote")
        ckpt_path = os.path.join(ckpt_path, META)
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

