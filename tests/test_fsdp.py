"""FSDP2 on two CPU processes through the real CLI (docs/sharding.md, issue #19).

The same seeded run of configs/full_stack.yaml (loss-aware sampler inside the curriculum, STF over
gathered references, post-hoc EMA with snapshots, LastCheckpoint) with a small EDM2 net (MP layers)
trains 16 steps three times: under DDP, under FSDP2 with one snapshot file per shard, and under HSDP
(replicated across two simulated nodes of one rank each) with gathered snapshots and checkpoint.
FSDP2 and HSDP must give DDP's weights, EMA profiles and validation loss to fp32 tolerance (the
gradient reduction sums in another order); sharded and gathered snapshots must equal, bit for bit,
the averages in their runs' checkpoints, and rebuild to the same weights; the sharded checkpoint
folder must gather to whole weights on one process. (The EMA restored on another layout:
tests/test_sharded_networks.py; a resume from a sharded folder: tests/test_crash_resume.py.)
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from digest_callback import subprocess_env  # tests/ is on sys.path

from lightning_diffusion.ema import list_snapshots, load_snapshot, reconstruct
from lightning_diffusion.ema.shard_files import whole_state
from lightning_diffusion.phema_tool import main as phema
from lightning_diffusion.sharded_checkpoint import is_sharded_checkpoint, load_whole_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 16, 16
SNAPSHOT_EVERY = 4 * 2 * BATCH  # every 4 steps over two ranks: snapshots at steps 4, 8, 12, 16
TRAINERS = {"ddp": ROOT / "configs" / "trainer" / "cpu_ddp.yaml", "fsdp": ROOT / "configs" / "trainer" / "cpu_fsdp.yaml"}


def _overlay(tmp_path: Path, gather: bool) -> Path:
    recipe = yaml.safe_load((ROOT / "configs" / "full_stack.yaml").read_text())
    tiny = {"LossAwareTimestepSampling": {"history": 2},
            "TimestepCurriculum": {"num_clusters": 4, "patience": 2, "max_steps_per_stage": 4,
                                   "check_every_n_steps": 2, "verbose": False},
            "PostHocEMA": {"snapshot_every_nimg": SNAPSHOT_EVERY, "gather_snapshots": gather},
            "LastCheckpoint": {"every_n_steps": 8}}
    callbacks = recipe["trainer"]["callbacks"]
    for callback in callbacks:
        callback["init_args"].update(tiny[callback["class_path"].rsplit(".", 1)[-1]])
    path = tmp_path / f"overlay-{gather}.yaml"
    # EDM2's magnitude-preserving net: forced weight normalization on each rank's rows, and 1-element
    # gains that leave the second rank an empty shard.
    net = {"class_path": "lightning_diffusion.networks.EDM2UNet",
           "init_args": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attention_resolutions": [4],
                         "channels_per_head": 16}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}, "model": {"init_args": {"net": net}}},
                                   sort_keys=False))
    return path


def _fit(tmp_path: Path, name: str, strategy: str, gather: bool = False, *extra: str) -> Path:
    root = tmp_path / name
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(ROOT / "configs" / "full_stack.yaml"),
           "--config", str(TRAINERS[strategy]), "--config", str(_overlay(tmp_path, gather)),
           "--model.init_args.process.init_args.num_timesteps=100", "--model.init_args.fd_samples=0",
           "--model.init_args.sample_steps=2", f"--data.init_args.batch_size={BATCH}", f"--trainer.max_steps={STEPS}",
           f"--trainer.val_check_interval={STEPS}", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           f"--trainer.default_root_dir={root}", *extra]
    env = subprocess_env(tmp_path / f"digests-{name}", OMP_NUM_THREADS="1")  # the same float reductions each run
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "lightning_logs" / "version_0"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last.ckpt"
    if is_sharded_checkpoint(last):
        return load_whole_checkpoint(last)["state_dict"]
    return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


def _sharded_ema(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA averages a sharded checkpoint folder holds (``_phema.<profile>.<name>``), read whole on this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = dcp.FileSystemReader(str(folder))
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith("state_dict._phema.")}
    state: dict = {}
    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return {k.removeprefix("_phema."): v for k, v in state["state_dict"].items()}


def _val_loss(run: Path) -> float:
    with open(run / "metrics.csv") as f:
        return [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")][-1]


def _snapshots(run: Path) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    return {(e["nimg"], e["sigma_rel"]): whole_state(e["files"], load_snapshot) for e in list_snapshots(run / "phema")}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp2_trains_like_ddp_and_its_snapshots_rebuild_either_way(tmp_path, capsys):
    """Slow: three 2-process CLI runs of 16 steps (~20 s each)."""
    ddp, sharded = _fit(tmp_path, "ddp", "ddp"), _fit(tmp_path, "sharded", "fsdp")
    # HSDP as on several nodes (shard_size=1: a (replicate=2, shard=1) mesh), with gathered snapshots and a
    # gathered checkpoint: one ordinary file each, written by rank 0
    hybrid = _fit(tmp_path, "hybrid", "fsdp", True, "--trainer.strategy.init_args.shard_size=1",
                  "--trainer.strategy.init_args.save_distributed_checkpoint=false")

    # A sharded checkpoint is a folder (one file per rank) that gathers to DDP's weights on one CPU.
    assert is_sharded_checkpoint(sharded / "checkpoints" / "last.ckpt")
    assert sorted(p.name for p in (sharded / "checkpoints" / "last.ckpt").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    want, got = _weights(ddp), _weights(sharded)
    assert sorted(got) == sorted(want) and "net.out_gain" in want
    one_file = torch.load(hybrid / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(one_file["state_dict"][key], want[key], rtol=1e-4, atol=1e-5, msg=f"HSDP {key}")

    # Snapshots: one file per shard and profile (FSDP2), one per profile (gathered HSDP, DDP).
    assert {e["layout"] for e in list_snapshots(sharded / "phema")} == {"2 shards"}
    assert {e["layout"] for e in list_snapshots(hybrid / "phema")} == {"whole"}
    assert len(list((sharded / "phema").glob("phema-*.shard-*-of-00002.pt"))) == 2 * len(list_snapshots(ddp / "phema"))
    manifest = json.loads((sharded / "phema" / "manifest.json").read_text())["snapshots"]
    assert all(len(e["files"]) == 2 and e["layout"] == "2 shards" for e in manifest) and len(manifest) == 8
    reference, shards, whole = _snapshots(ddp), _snapshots(sharded), _snapshots(hybrid)
    assert sorted(shards) == sorted(reference) == sorted(whole) and len(reference) == 8
    for key, state in reference.items():  # the EMA profiles of FSDP2 and HSDP are DDP's, to fp32 tolerance
        for name, value in state.items():
            torch.testing.assert_close(shards[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
            torch.testing.assert_close(whole[key][name], value, rtol=1e-4, atol=1e-5, msg=f"HSDP {key} {name}")

    # The last snapshots are, bit for bit, the averages each run's checkpoint holds: sharded rows put back
    # together (FSDP2: the checkpoint folder's sharded entries), gathered whole (HSDP: the one file's).
    sharded_ema = _sharded_ema(sharded / "checkpoints" / "last.ckpt")
    ema_state = one_file["callbacks"]["PostHocEMA"]["ema"]
    gathered_ema = {f"{i}.{k}": v for i, averages in enumerate(ema_state["averages"])
                    for k, v in zip(ema_state["param_names"], averages)}
    assert gathered_ema.keys() == sharded_ema.keys()
    last = max(n for n, _ in reference)
    for i, sigma_rel in enumerate((0.05, 0.10)):
        for name in ema_state["param_names"]:
            assert torch.equal(shards[(last, sigma_rel)]["net." + name], sharded_ema[f"{i}.{name}"]), name
            assert torch.equal(whole[(last, sigma_rel)]["net." + name], gathered_ema[f"{i}.{name}"]), name

    # Post-hoc reconstruction from either layout gives the same whole state dict.
    from_shards = reconstruct([e["files"] for e in list_snapshots(sharded / "phema")], [0.08])[0]
    from_whole = reconstruct([e["file"] for e in list_snapshots(hybrid / "phema")], [0.08])[0]
    assert sorted(from_shards) == sorted(from_whole) and from_shards["net.conv_in.weight"].shape == \
        want["net.conv_in.weight"].shape
    for key in from_whole:
        torch.testing.assert_close(from_shards[key], from_whole[key], rtol=1e-4, atol=1e-5, msg=key)
    # Validation swapped the sigma_rel=0.10 profile in on every rank's rows: the same loss as under DDP.
    assert _val_loss(sharded) == pytest.approx(_val_loss(ddp), rel=1e-4)

    # lightning-diffusion-phema rebuilds a sharded run into one ordinary checkpoint on this one process.
    phema(["rebuild", str(tmp_path / "sharded"), "--sigma_rel", "0.08"])
    rebuilt = torch.load(capsys.readouterr().out.split()[-1], map_location="cpu", weights_only=True)
    assert sorted(rebuilt["state_dict"]) == sorted(want) and "optimizer_states" not in rebuilt
    assert all(torch.equal(rebuilt["state_dict"][k], v) for k, v in from_shards.items())

    # forced weight normalization ran on each rank's rows: every MP weight row has unit RMS (docs/algorithms.md 3.1)
    rms = got["net.conv_in.weight"].flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
