"""configs/full_stack.yaml under DDP through the real CLI, as two simulated nodes of one CPU rank each
(the same recipe on two ranks of one machine, under DDP beside FSDP2: tests/test_fsdp.py).

The run shrinks the recipe to seconds and adds ``tests/digest_callback.py`` to the trainer, which
writes each rank's state digest at the end of fit. The ranks must agree bit for bit on the
parameters, every PostHocEMA average and the loss-aware sampler's history; the curriculum must
have switched stages at the same steps on both; only global rank 0 writes files.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from digest_callback import digest, subprocess_env  # tests/ is on sys.path (pytest's rootdir-relative import)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "full_stack.yaml"
CPU_DDP = ROOT / "configs" / "trainer" / "cpu_ddp.yaml"

STEPS = 16
BATCH = 32  # per rank: 64 images per optimizer step over the two ranks
SNAPSHOT_EVERY_NIMG = 5 * 2 * BATCH  # every 5 steps: snapshots at steps 5, 10, 15
SNAPSHOT_NIMGS = [SNAPSHOT_EVERY_NIMG * k for k in (1, 2, 3)]
SIGMA_RELS = [0.05, 0.10]

# The recipe's callbacks, in the recipe's order, with only their budget shrunk to 16 steps.
TINY_CALLBACK_ARGS = {
    "LossAwareTimestepSampling": {"history": 2},  # 25 timesteps per stage x 2 losses: warm in a few steps
    "TimestepCurriculum": {"num_clusters": 4, "patience": 2, "max_steps_per_stage": 4, "check_every_n_steps": 2,
                           "verbose": False},
    "PostHocEMA": {"snapshot_every_nimg": SNAPSHOT_EVERY_NIMG},
    "LastCheckpoint": {"every_n_steps": 8},  # a save mid-run and at the end, under DDP
}


def _tiny_overlay(tmp_path: Path) -> Path:
    """The recipe's callbacks list with tiny-budget settings (a list in a later YAML replaces the earlier)."""
    recipe = yaml.safe_load(RECIPE.read_text())
    callbacks = recipe["trainer"]["callbacks"]
    names = [c["class_path"].rsplit(".", 1)[-1] for c in callbacks]
    assert names == ["LossAwareTimestepSampling", "TimestepCurriculum", "PostHocEMA", "LastCheckpoint"]
    assert recipe["model"]["init_args"]["target"]["init_args"]["source"] == "gather"
    for callback, name in zip(callbacks, names):
        callback["init_args"].update(TINY_CALLBACK_ARGS[name])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, sort_keys=False))
    return path


def _fit_args(tmp_path: Path) -> list[str]:
    return [
        "fit", "--config", str(RECIPE), "--config", str(CPU_DDP), "--config", str(_tiny_overlay(tmp_path)),
        "--trainer.callbacks+=digest_callback.DigestCallback",
        "--model.init_args.net.init_args.model_channels=16",
        "--model.init_args.net.init_args.attention_resolutions=[]",
        "--model.init_args.process.init_args.num_timesteps=100",
        "--model.init_args.fd_samples=0",
        "--model.init_args.sample_steps=2",
        f"--data.init_args.batch_size={BATCH}",
        f"--trainer.max_steps={STEPS}",
        f"--trainer.val_check_interval={STEPS}",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.default_root_dir=run",  # relative: each node's working directory is its own disk
    ]


def _check_run(tmp_path: Path) -> dict:
    """The assertions on the run; returns rank 0's digest.

    The (first) node ran in ``tmp_path/node0`` with ``default_root_dir=run``; the digests, the
    overlay YAML and any other node's working directory are elsewhere under ``tmp_path``.
    """
    digests = [json.loads((tmp_path / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(p.name for p in (tmp_path / "digests").iterdir()) == ["rank0.json", "rank1.json"]
    rank0, rank1 = digests
    assert (rank0["global_rank"], rank1["global_rank"]) == (0, 1) and rank0["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == STEPS
    # Bit-identical training state on both ranks.
    for key in ("params", "ema", "ema_buffers", "timesteps", "ema_num_updates", "ema_nimg", "ema_snapshots",
                "curriculum_stage", "curriculum_switches", "warm_steps", "timesteps_type"):
        assert rank0[key] == rank1[key], key
    assert rank0["timesteps_type"] == "LossAwareTimesteps"
    assert rank0["warm_steps"], "the loss-aware sampler never left its warm-up"
    assert rank0["ema_num_updates"] == STEPS and rank0["ema_nimg"] == STEPS * 2 * BATCH
    assert len(rank0["ema"]) == 2 and rank0["ema"][0] != rank0["ema"][1]
    assert rank0["curriculum_stage"] > 1 and len(rank0["curriculum_switches"]) == rank0["curriculum_stage"] - 1

    # Only global rank 0 wrote: one log version, one config, one checkpoint.
    run = tmp_path / "node0" / "run"
    versions = sorted((run / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0"]
    log_dir = versions[0]
    assert sorted(p.name for p in run.iterdir()) == ["lightning_logs"]
    assert sorted(p.name for p in (tmp_path / "node0").iterdir()) == ["run"]
    assert len(list(tmp_path.rglob("config.yaml"))) == 1 and (log_dir / "config.yaml").is_file()
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))  # Lightning's at the epoch's end, then last.ckpt
    assert [p.name for p in checkpoints] == [f"epoch=0-step={STEPS}.ckpt", "last.ckpt"]
    assert all(p.parent == log_dir / "checkpoints" for p in checkpoints)
    assert rank0["checkpoint_io"] == rank1["checkpoint_io"] == "AtomicCheckpointIO"  # the CLI's default
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # atomic writes left no temp file
    assert len(list(tmp_path.rglob("checkpoints"))) == 1

    # Snapshots: each written once, by rank 0, into one folder; the manifest lists each once.
    assert len(list(tmp_path.rglob("phema"))) == 1
    phema = log_dir / "phema"
    assert rank0["ema_dir"] == rank1["ema_dir"] == str(phema.relative_to(tmp_path / "node0"))
    expected = sorted(f"phema-{n:012d}-{s:.4f}.pt" for n in SNAPSHOT_NIMGS for s in SIGMA_RELS)
    assert sorted(p.name for p in phema.iterdir()) == sorted(expected + ["manifest.json"])  # no temp files
    assert sorted(rank0["ema_snapshots"]) == expected
    manifest = [e["file"] for e in json.loads((phema / "manifest.json").read_text())["snapshots"]]
    assert sorted(manifest) == expected and len(set(manifest)) == len(manifest)

    # The checkpoint holds plain data only, and the state the ranks agreed on.
    ckpt = torch.load(checkpoints[0], weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert ckpt["callbacks"]["TimestepCurriculum"]["pacer"]["stage"] == rank0["curriculum_stage"]
    assert ckpt["callbacks"]["PostHocEMA"]["ema"]["num_updates"] == STEPS
    assert len(ckpt["callbacks"]["PostHocEMA"]["snapshots"]) == len(expected)
    assert digest(ckpt["diffusion"]["timesteps"]) == rank0["timesteps"]
    # The raw weights the ranks ended with (PostHocEMA swapped its average out before the save).
    assert digest({k: ckpt["state_dict"][k] for k in rank0["param_names"]}) == rank0["params"]
    return rank0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(420)
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed next to this Python")
def test_full_stack_two_simulated_nodes(tmp_path):
    """Two torchrun "nodes" of one CPU process each: global rank 0 alone writes, not each local rank 0 (~7 s)."""
    start = time.monotonic()
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    port = _free_port()
    # One core per simulated node; Lightning would give each (local world size 1) every core.
    env = subprocess_env(tmp_path / "digests", OMP_NUM_THREADS="1")
    procs = []
    (tmp_path / "logs").mkdir()
    for node_rank in (0, 1):
        (tmp_path / f"node{node_rank}").mkdir()  # each node's own working directory (its local disk)
        cmd = [torchrun, "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}",
               "-m", "lightning_diffusion", *_fit_args(tmp_path),
               "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"]
        log = open(tmp_path / "logs" / f"node{node_rank}.log", "w")
        proc = subprocess.Popen(cmd, cwd=tmp_path / f"node{node_rank}", env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
    try:
        codes = [proc.wait(timeout=360) for proc, _ in procs]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = {n: (tmp_path / "logs" / f"node{n}.log").read_text()[-3000:] for n in (0, 1)}
    assert codes == [0, 0], logs
    rank0 = _check_run(tmp_path)
    # Node 1's local rank 0 (global rank 1) wrote nothing to its disk: no logs, config, checkpoint, snapshot.
    assert list((tmp_path / "node1").iterdir()) == []
    digests = [json.loads((tmp_path / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Really two nodes: rank 1 is local rank 0 of node 1 (the case a local_rank == 0 check gets wrong).
    assert [(d["node_rank"], d["local_rank"]) for d in digests] == [(0, 0), (1, 0)]
    assert rank0["world_size"] == 2
    print(f"two simulated nodes: {time.monotonic() - start:.1f} s")
