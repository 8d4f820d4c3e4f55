"""A user's first hour with the CLI: a short fit leaves a sample grid, a metrics row and last.ckpt; a
typo, a linked override or a bad checkpoint is one ``error:`` line (exit status 2, nothing written, no
code from the file run); the quickstart prints no noise; validate/predict write beside the run their
checkpoint came from; TensorBoard holds the scalars, the sample grids and the level histograms.
"""

from __future__ import annotations

import csv
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, tiny_unet
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import ROOT, tiny_args

from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import PostHocEMA
from lightning_diffusion.cli import DiffusionCLI
from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.phema_tool import main as phema_main

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _refused(args: list[str], capsys) -> str:
    """Run the CLI in process; it must exit with status 2 and print exactly one line, ``error: ...``."""
    with pytest.raises(SystemExit) as exit_info:
        DiffusionCLI(args=args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set to")]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _short_fit_args(root: Path, steps: int = 4) -> list[str]:
    """Shorter than validation (every 50 steps) and than the logging interval (50): only the end writes."""
    return [*tiny_args(root, steps=steps), "--model.init_args.fd_samples=0", "--trainer.val_check_interval=50",
            "--trainer.log_every_n_steps=50"]


# ---------------------------------------------------------------- 1. a short fit leaves something

def test_short_fit_leaves_a_sample_grid_a_metrics_row_and_last_ckpt(tmp_path):
    cli = DiffusionCLI(args=["fit", *_short_fit_args(tmp_path)])
    log_dir = Path(cli.trainer.log_dir)
    assert sorted(p.name for p in (log_dir / "samples").iterdir()) == ["last.png", "step_0000004.png"]
    with Image.open(log_dir / "samples" / "last.png") as image:
        assert image.format == "PNG" and image.width >= 32 * 10  # 100 digits, tiles enlarged to 32 px
    train = [r for r in _rows(log_dir) if r.get("train/loss")]
    assert [r["step"] for r in train] == ["3"] and math.isfinite(float(train[0]["train/loss"]))
    assert torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_phema_rebuild_without_a_checkpoint_says_why_it_writes_weights(tmp_path, capsys):
    cb = PostHocEMA(snapshot_every_nimg=16, dirpath=str(tmp_path / "phema"))
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[cb]).fit(
        DiffusionLightningModule(tiny_unet()), datamodule=DigitsDataModule(batch_size=16))
    phema_main(["rebuild", str(tmp_path), "--sigma_rel", "0.10", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert [Path(p).name for p in out.split()] == ["weights-000000000032-0.1000.pt"]
    assert err.splitlines() == [
        f"lightning-diffusion-phema: {tmp_path} holds no training checkpoint (*.ckpt) to copy, so this writes plain "
        "weights-*.pt (a state_dict for load_state_dict) instead of phema-*.ckpt; pass --template <a .ckpt of "
        "this model> for checkpoints that validate and predict load"]


# ---------------------------------------------------------------- 2. errors in one line, exit status 2

@pytest.mark.parametrize("override, line", [
    (["--model.init_args.weighting.init_args.gama=1"], "error: model.init_args.weighting.init_args.gama: "
     "MinSNRWeighting has no setting 'gama'; did you mean gamma?"),
    (["--model.init_args.net.init_args.chanel_mult=[1]"], "error: model.init_args.net.init_args.chanel_mult: "
     "UNet has no setting 'chanel_mult'; did you mean channel_mult?"),
    (["--trainer.max_stepz=3"], "error: trainer.max_stepz: not a setting of fit; did you mean trainer.max_steps "
     "or trainer.max_time or trainer.min_steps?"),
], ids=["class_setting", "network_setting", "trainer_setting"])
def test_a_typo_in_a_key_is_one_line_naming_the_closest_keys(tmp_path, capsys, override, line):
    assert _refused(["fit", *tiny_args(tmp_path / "run"), *override], capsys) == line
    assert not (tmp_path / "run").exists()


def test_a_typo_in_a_config_file_is_one_line_too(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model:\n  init_args:\n    weighting:\n      init_args:\n        gama: 3\n")
    line = _refused(["fit", *tiny_args(tmp_path / "run"), "--config", str(recipe)], capsys)
    assert line == "error: model.init_args.weighting.init_args.gama: MinSNRWeighting has no setting 'gama'; " \
                   "did you mean gamma?"


def test_an_override_of_a_linked_setting_is_refused_naming_its_source(tmp_path, capsys):
    line = _refused(["fit", *tiny_args(tmp_path / "run", steps=2), "--model.init_args.net.init_args.image_size=16"],
                    capsys)
    assert line == ("error: model.init_args.net.init_args.image_size=16 is linked from data.image_size (here 8), "
                    "which replaces it; set --data.init_args.image_size=16 instead")
    assert not (tmp_path / "run").exists()


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
@pytest.mark.parametrize("kind", ["missing", "truncated", "runs_code", "runs_code_plain_pickle"])
def test_a_bad_ckpt_path_is_one_line_and_never_runs_the_files_code(tmp_path, capsys, subcommand, kind):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, good)
    marker, path = tmp_path / "code_ran", tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:2000])
    elif kind == "runs_code":
        torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, path)
    elif kind == "runs_code_plain_pickle":
        path.write_bytes(pickle.dumps({"payload": _RunsCode(marker)}))
    line = _refused([subcommand, *tiny_args(tmp_path / "run"), f"--ckpt_path={path}"], capsys)
    why = {"missing": "is not a file; give a checkpoint that fit wrote, e.g. <run>/checkpoints/last.ckpt",
           "truncated": "cannot be read as a checkpoint (it is truncated or not a PyTorch checkpoint); use a "
                        "checkpoint that fit wrote",
           "runs_code": "cannot be read as a checkpoint (it holds objects other than tensors and plain data, and "
                        "loading them could run code from the file); use a checkpoint that fit wrote",
           "runs_code_plain_pickle": "cannot be read as a checkpoint (it is truncated or not a PyTorch checkpoint); "
                                     "use a checkpoint that fit wrote"}[kind]
    assert line == f"error: --ckpt_path: '{path}' {why}"
    assert "weights_only" not in line and not marker.exists()
    assert not (tmp_path / "run").exists()  # no empty version_N folder


# ---------------------------------------------------------------- 3. quiet, correct output

NOISE = ["litlogger", "litmodels", "tensorboardX", "LeafSpec", "Skipping setting a default", "logging interval",
         "FLOPs", "/-2", "v_num"]
EXPECTED_LOG_LINES = (r"Seed set to 0", r"GPU available: .*", r"TPU available: .*", r"💡 Tip: .*GPU.*",
                      r"`Trainer.fit` stopped: `max_steps=6` reached\.")


def _run(root: Path, *args: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "COLUMNS")}
    result = subprocess.run([sys.executable, "-m", "lightning_diffusion", *args], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr


def test_quickstart_prints_the_summary_and_a_step_bar_and_no_noise(tmp_path):
    output = _run(tmp_path, "fit", *_short_fit_args(tmp_path, steps=6), "--trainer.enable_progress_bar=true",
                  "--trainer.log_every_n_steps=3")
    stdout, stderr = output
    assert not [n for n in NOISE if n in stdout + stderr], stdout + stderr
    assert "│ 0 │ net  │ UNet │" in stdout and "Total params: 173 K" in stdout
    bar = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(bar) == 1 and " 6/6 " in bar[0] and "train/loss: " in bar[0], stdout
    unexpected = [line for line in stderr.splitlines() if not any(re.fullmatch(p, line) for p in EXPECTED_LOG_LINES)]
    assert not unexpected, stderr


def test_validate_and_predict_write_beside_the_checkpoints_run(tmp_path, recwarn):
    run = Path(DiffusionCLI(args=["fit", *_short_fit_args(tmp_path, steps=2)]).trainer.log_dir)
    fit_files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    ckpt = run / "checkpoints" / "last.ckpt"
    recwarn.clear()
    DiffusionCLI(args=["validate", *_short_fit_args(tmp_path), f"--ckpt_path={ckpt}"])
    DiffusionCLI(args=["predict", *_short_fit_args(tmp_path), f"--ckpt_path={ckpt}",
                       "--trainer.limit_predict_batches=1"])
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # no version_1, version_2
    assert [float(r["val/loss"]) > 0 for r in _rows(run / "validate")] == [True]
    assert (run / "validate" / "config.yaml").is_file()
    assert (run / "predict" / "samples" / "predict_rank0_batch0000.png").is_file()
    assert {p: p.read_bytes() for p in fit_files} == fit_files  # the fit's config, metrics, grids untouched
    assert not [str(w.message) for w in recwarn if "dirpath has changed" in str(w.message)]


# ---------------------------------------------------------------- 4. TensorBoard beside metrics.csv

def test_fit_logs_scalars_sample_grids_and_level_histograms_to_tensorboard(tmp_path):
    recipe = ["--config", str(ROOT / "configs" / "loss_aware.yaml")]  # the quickstart plus LossAwareTimestepSampling
    cli = DiffusionCLI(args=["fit", *recipe, *tiny_args(tmp_path, steps=4)[2:], "--model.init_args.fd_samples=0",
                             "--trainer.log_every_n_steps=2"])
    log_dir = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/loss", "loss_aware/t_q50"} <= set(tags["scalars"])
    assert [e.step for e in events.Images("samples")] == [2, 4]  # after each validation
    assert [e.step for e in events.Histograms("loss_aware/t")] == [2, 4]  # levels drawn, log_every_n_steps apart
    csv_loss = [float(r["train/loss"]) for r in _rows(log_dir) if r.get("train/loss")]
    assert len(csv_loss) == 2 and csv_loss == pytest.approx([e.value for e in events.Scalars("train/loss")])
