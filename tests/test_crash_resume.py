"""Crash and resume is exact (issue #10, item 3).

The whole stack (a timestep sampler inside the curriculum, STF, post-hoc EMA with snapshots, an LR
schedule) trains through the real CLI in a subprocess that is killed with SIGKILL at a random step
after at least one checkpoint. A second run resumes from the newest checkpoint. Compared with an
uninterrupted run of the same seed, on CPU, bit for bit: model weights, EMA weights, optimizer and
LR-schedule state, timestep-sampler state, curriculum stage and switches, the data loader's position,
and, step by step, the batch each step trained on and the noise levels it drew.

The first case kills after the checkpoint written at the last batch of an epoch, the step where
Lightning's own epoch bookkeeping and the data order are easiest to get out of step. The second
kills at a random step (printed on failure) of a run on two ranks under FSDP2 (docs/sharding.md):
sharded weights, optimizer state and EMA averages, restored from a checkpoint folder. Both ranks of a
DDP run killed and resumed: tests/test_foreign_module.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from digest_callback import subprocess_env  # tests/ is on sys.path

from lightning_diffusion.ema import load_manifest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 72
BATCH = 32  # 1,617 training digits: 50 batches per epoch, so the run crosses an epoch boundary at step 50
EVERY = 10  # checkpoint cadence (steps)
SAMPLERS = {
    "adaptive": {"class_path": "lightning_diffusion.callbacks.AdaptiveTimestepSampling",
                 "init_args": {"update_every": 6, "subset_size": 2, "buffer_size": 4, "probe_grid": 8,
                               "policy_channels": 8}},
}
# Keys of the final digests that must match the uninterrupted run (see tests/digest_callback.py).
EXACT = ("global_step", "params", "ema", "ema_buffers", "ema_num_updates", "ema_nimg", "ema_snapshots", "timesteps",
         "timesteps_type", "curriculum_stage", "curriculum_switches", "optimizers", "lr_schedulers", "draws",
         "data_position")


def _config(tmp_path: Path, sampler: str, steps: int = STEPS) -> Path:
    """configs/full_stack.yaml at test size, with a checkpoint every EVERY steps and the recorders."""
    config = yaml.safe_load((ROOT / "configs" / "full_stack.yaml").read_text())
    trainer, model = config["trainer"], config["model"]["init_args"]
    trainer.update(max_steps=steps, val_check_interval=25, limit_val_batches=2, log_every_n_steps=5,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    by_name = {c["class_path"].rsplit(".", 1)[-1]: c for c in trainer["callbacks"]}
    by_name["TimestepCurriculum"]["init_args"].update(num_clusters=5, patience=4, max_steps_per_stage=10,
                                                      check_every_n_steps=2)
    by_name["PostHocEMA"]["init_args"].update(snapshot_every_nimg=12 * BATCH)
    trainer["callbacks"] = [
        SAMPLERS[sampler], by_name["TimestepCurriculum"], by_name["PostHocEMA"],
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": EVERY, "save_top_k": -1}},
        {"class_path": "digest_callback.DigestCallback"},
        {"class_path": "digest_callback.StepRecorder"},
    ]
    model["net"]["init_args"].update(model_channels=16, attention_resolutions=[], dropout=0.1)
    model["process"]["init_args"]["num_timesteps"] = 100
    model["target"]["init_args"].update(source="fresh", reference_size=64)
    model.update(fd_samples=0, sample_steps=4, lr_scheduler={
        "class_path": "lightning_diffusion.optim.EDM2LRScheduler",
        "init_args": {"ref_images": 40 * BATCH, "rampup_images": 8 * BATCH}})
    config["data"]["init_args"]["batch_size"] = BATCH
    path = tmp_path / f"{sampler}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cmd(config: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(config),
            f"--trainer.default_root_dir={root}", *extra]


def _env(digests: Path) -> dict[str, str]:
    return subprocess_env(digests, OMP_NUM_THREADS="1")  # one thread: the same float reductions in every run


def _run(cmd: list[str], digests: Path) -> None:
    result = subprocess.run(cmd, env=_env(digests), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _steps(digests: Path, rank: int = 0) -> list[dict]:
    path = digests / f"steps-rank{rank}.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # a line still being written has no "\n"
    return [json.loads(line) for line in lines]


def _kill_after(cmd: list[str], digests: Path, step: int) -> None:
    """Start ``cmd`` and SIGKILL it (all its ranks: the process group, as a lost node or a scheduler
    would) once rank 0 has recorded ``step``; the kill lands somewhere in a later step."""
    process = subprocess.Popen(cmd, env=_env(digests), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (_steps(digests) and _steps(digests)[-1]["step"] >= step):
            assert process.poll() is None, f"finished before step {step}: {process.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, f"step {step} not reached within 240 s"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def _load(checkpoint: Path) -> dict:
    """A checkpoint file, or the plain part (``meta.pt``) of a sharded FSDP2 checkpoint folder."""
    return torch.load(checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint, weights_only=True)


def _newest_checkpoint(log_dir: Path) -> tuple[Path, int]:
    steps = {int(p.stem.rsplit("step=", 1)[1]): p for p in log_dir.glob("checkpoints/*step=*.ckpt")}
    assert steps, f"no checkpoint in {log_dir} before the kill"
    return steps[max(steps)], max(steps)


@pytest.mark.slow
@pytest.mark.timeout(600)
# Two ranks: sharded weights, optimizer and EMA, the look-ahead on shards; 32 steps cross the epoch boundary
# (25 steps of 2 x 32 images). DDP's kill-and-resume is exact too: tests/test_foreign_module.py.
@pytest.mark.parametrize("sampler, strategy, steps, kill_range", [
    ("adaptive", None, STEPS, (51, 58)),  # resumes from the checkpoint of step 50, the last batch of epoch 0
    ("adaptive", "fsdp", 32, (EVERY + 1, 28)),
], ids=["adaptive-after_epoch_end_checkpoint", "fsdp2-adaptive-random_step"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, sampler, strategy, steps, kill_range):
    """Slow: three CLI runs each (~20 s on one process for 72 steps, ~45 s on two FSDP2 ranks for 32).

    ``LD_KILL_STEP=<n>`` replays a failure at the step it reports.
    """
    start = time.monotonic()
    kill_step = int(os.environ.get("LD_KILL_STEP", 0)) or random.SystemRandom().randint(*kill_range)
    where = f"(killed after step {kill_step}; LD_KILL_STEP={kill_step} reproduces it)"
    config = _config(tmp_path, sampler, steps)
    devices = 1 if strategy is None else 2
    layout = [] if strategy is None else ["--config", str(ROOT / "configs" / "trainer" / "cpu_fsdp.yaml")]
    reference, crashed, resumed = (tmp_path / name for name in ("reference", "crashed", "resumed"))

    _run(_cmd(config, tmp_path / "run_a", *layout), reference)
    _kill_after(_cmd(config, tmp_path / "run_b", *layout), crashed, kill_step)
    checkpoint, saved_step = _newest_checkpoint(tmp_path / "run_b" / "lightning_logs" / "version_0")
    assert saved_step >= EVERY and _load(checkpoint)["global_step"] == saved_step
    phema = tmp_path / "run_b" / "lightning_logs" / "version_0" / "phema"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in phema.glob("phema-*.pt")}
    _run(_cmd(config, tmp_path / "run_b", *layout, f"--ckpt_path={checkpoint}"), resumed)

    for rank in range(devices):
        want, killed, after = (_steps(d, rank) for d in (reference, crashed, resumed))
        assert [r["step"] for r in want] == list(range(1, steps + 1))
        assert killed == want[: len(killed)], where
        # The resumed run starts at the step after the checkpoint and repeats the uninterrupted run:
        # same data batch, same drawn noise levels, every step, on every rank.
        assert [r["step"] for r in after] == list(range(saved_step + 1, steps + 1)), where
        for got, expected in zip(after, want[saved_step:]):
            assert got == expected, f"rank {rank}: step {got['step']} differs {where}"

        final, ref = (json.loads((d / f"rank{rank}.json").read_text()) for d in (resumed, reference))
        for key in EXACT:
            assert final[key] == ref[key], f"rank {rank}: {key} differs {where}"
        assert ref["curriculum_stage"] > 1 and ref["ema_snapshots"], "the run is too short to exercise the stack"
        assert ref["data_position"] == [{"batches_seen": steps, "batch_size": BATCH, "world_size": devices,
                                         "seed": 0, "dataset_size": 1617}]
    assert len(_steps(crashed)) >= kill_step

    # Every snapshot of the run is listed once in the manifest of the folder the run kept writing to
    # (the first run's, continued on resume) and loads; the resumed run rewrote none of them.
    assert all((phema / name).stat().st_mtime_ns == t and (phema / name).read_bytes() == b
                          for name, (t, b) in before.items()), where
    assert Path(final["ema_dir"]).resolve() == phema.resolve(), where
    manifest = [entry["file"] for entry in load_manifest(phema)]
    assert sorted(manifest) == sorted(ref["ema_snapshots"]) and len(set(manifest)) == len(manifest)
    for name in manifest:
        torch.load(phema / name, weights_only=True)
    print(f"{sampler}, {devices} process(es): killed after step {kill_step}, resumed from step {saved_step}, "
          f"{time.monotonic() - start:.1f} s")
