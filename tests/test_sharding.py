"""FSDP2 pieces that need no second process (docs/sharding.md): sharded snapshot files, their checks,
strategy refusals, sharded checkpoint folders in the CLI, and the EDM2 gains FSDP2 can shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lightning_diffusion.callbacks.ema_shards import write_once
from lightning_diffusion.ema import list_snapshots, load_snapshot, reconstruct, save_snapshot, shard_header
from lightning_diffusion.ema import shard_snapshot_name, snapshot_name
from lightning_diffusion.ema.shard_files import whole_state
from lightning_diffusion.networks import EDM2UNet
from lightning_diffusion.phema_tool import main as phema
from lightning_diffusion.sharding import FSDP2Strategy, check_strategy, data_parallel_mesh

SIGMA, GAMMA = 0.10, 6.937


def _write_shards(folder: Path, state: dict[str, torch.Tensor], count: int, nimg: int = 100,
                  skip: tuple[int, ...] = ()) -> list[Path]:
    """Split ``state`` the way FSDP2 does (torch.chunk rows: the last shards may be short or empty)."""
    paths = []
    for index in range(count):
        rows, offsets = {}, []
        for key, value in state.items():
            chunk = -(-value.shape[0] // count)
            start = min(index * chunk, value.shape[0])
            rows[key] = value[start:start + chunk]
            offsets.append(start)
        header = shard_header(list(state), offsets, [v.shape for v in state.values()], index, count)
        path = folder / shard_snapshot_name(nimg, SIGMA, index, count)
        if index not in skip:
            save_snapshot(path, {**rows, "step": torch.tensor(7)}, SIGMA, GAMMA, nimg, shard=header)
        paths.append(path)
    return paths


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"net.w": torch.randn(5, 3, generator=g), "net.gain": torch.randn(1, generator=g),
            "net.b": torch.randn(7, generator=g)}


def test_shards_rebuild_to_the_whole_tensors_even_with_empty_shards(tmp_path):
    state = _state()
    paths = _write_shards(tmp_path, state, count=4)  # 5 rows over 4: 2, 2, 1, 0; the gain lives on rank 0
    assert load_snapshot(paths[3])["state_dict"]["net.w"].shape == (0, 3)
    whole = whole_state(paths, load_snapshot)
    assert all(torch.equal(whole[k], v) for k, v in state.items()) and int(whole["step"]) == 7
    entries = list_snapshots(tmp_path)
    assert len(entries) == 1 and entries[0]["layout"] == "4 shards" and entries[0]["files"] == [str(p) for p in paths]
    # the same snapshot as one whole file reconstructs identically
    save_snapshot(tmp_path / "whole" / snapshot_name(100, SIGMA), state, SIGMA, GAMMA, 100)
    a = reconstruct([entries[0]["files"]], [SIGMA])[0]
    b = reconstruct([tmp_path / "whole" / snapshot_name(100, SIGMA)], [SIGMA])[0]
    assert all(torch.equal(a[k], b[k]) for k in state)


def test_a_missing_rank_file_is_one_sentence_with_exit_2(tmp_path, capsys):
    _write_shards(tmp_path / "phema", _state(), count=3, skip=(1,))
    with pytest.raises(ValueError, match=r"written by 3 ranks but the files of rank\(s\) \[1\] are missing"):
        list_snapshots(tmp_path / "phema")
    with pytest.raises(SystemExit) as exit_info:
        phema(["list", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "rank(s) [1] are missing" in err
    with pytest.raises(SystemExit):
        phema(["rebuild", str(tmp_path), "--sigma_rel", "0.08"])
    assert capsys.readouterr().err.endswith("copy every rank's file, or remove the incomplete set.\n")
    assert not (tmp_path / "phema_rebuilt").exists()


@pytest.mark.parametrize("other", ["whole", "4 shards"])
def test_one_snapshot_in_two_layouts_is_refused(tmp_path, other):
    _write_shards(tmp_path, _state(), count=2)
    if other == "whole":
        save_snapshot(tmp_path / snapshot_name(100, SIGMA), _state(), SIGMA, GAMMA, 100)
    else:
        _write_shards(tmp_path, _state(), count=4)
    with pytest.raises(ValueError, match="in two layouts .* keep one run's snapshots per folder"):
        list_snapshots(tmp_path)


def test_snapshots_in_different_layouts_at_different_times_rebuild(tmp_path):
    """A resume on another number of ranks writes later snapshots in its layout: the set still rebuilds."""
    _write_shards(tmp_path, _state(0), count=2, nimg=100)
    save_snapshot(tmp_path / snapshot_name(200, SIGMA), _state(1), SIGMA, GAMMA, 200)
    _write_shards(tmp_path, _state(2), count=4, nimg=300)
    entries = list_snapshots(tmp_path)
    assert [e["layout"] for e in entries] == ["2 shards", "whole", "4 shards"]
    out = reconstruct([e["files"] for e in entries], [SIGMA])[0]
    assert out["net.w"].shape == (5, 3) and torch.isfinite(out["net.w"]).all()


def test_a_resume_never_writes_a_snapshot_the_folder_holds_in_another_layout(tmp_path):
    _write_shards(tmp_path, _state(), count=2)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    write_once(tmp_path / shard_snapshot_name(100, SIGMA, 0, 4), _state(3), SIGMA, GAMMA, 100, "float32")
    write_once(tmp_path / snapshot_name(100, SIGMA), _state(3), SIGMA, GAMMA, 100, "float32")
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert [e["layout"] for e in list_snapshots(tmp_path)] == ["2 shards"]


def test_strategies_that_flatten_parameters_are_refused_in_one_sentence():
    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):  # (DeepSpeed not installed)
        with pytest.raises(ValueError, match=r"flattens the parameters.*configs/trainer/fsdp.yaml"):
            check_strategy(strategy, "PostHocEMA")
    with pytest.raises(ValueError, match="shard_size=0 must be >= 1"):
        FSDP2Strategy(shard_size=0)


def test_tensor_parallel_meshes_are_refused():
    class Mesh(SimpleNamespace):
        def __getitem__(self, name: str) -> SimpleNamespace:
            return SimpleNamespace(size=lambda: self.sizes[name])

    mesh = Mesh(mesh_dim_names=("data_parallel", "tensor_parallel"), sizes={"data_parallel": 1, "tensor_parallel": 2})
    with pytest.raises(ValueError, match="no tensor parallelism; use tensor_parallel_size=1"):
        data_parallel_mesh(mesh)


def test_a_sharded_checkpoint_folder_without_its_meta_file_is_refused(tmp_path, capsys):
    from lightning_diffusion.cli import main

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), f"--ckpt_path={folder}",
              f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2 and "sharded checkpoint folder without its meta.pt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_edm2_gains_are_vectors_fsdp2_can_shard_and_scalar_checkpoints_still_load():
    net = EDM2UNet(model_channels=16)
    assert not any(p.ndim == 0 for p in net.parameters())  # fully_shard refuses 0-dim parameters
    old = {k: (v.reshape(()) if k.endswith("gain") else v) for k, v in net.state_dict().items()}
    old["out_gain"] = torch.tensor(0.25)
    net.load_state_dict(old)
    assert net.out_gain.shape == (1,) and float(net.out_gain.detach()) == 0.25


@pytest.mark.parametrize("strategy, message", [
    ({"class_path": "lightning_diffusion.sharding.FSDP2Strategy", "init_args": {"shard_size": 3}},
     "error: FSDP2Strategy.shard_size=3 must divide the number of processes (2 = num_nodes x devices)."),
], ids=["shard_size"])  # tensor parallelism: the same path (test_tensor_parallel_meshes_are_refused has the sentence)
def test_layouts_that_cannot_shard_stop_both_ranks_with_one_sentence(tmp_path, strategy, message):
    overlay = tmp_path / "strategy.yaml"
    overlay.write_text(json.dumps({"trainer": {"accelerator": "cpu", "devices": 2, "strategy": strategy}}))
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    result = subprocess.run([sys.executable, "-m", "lightning_diffusion", "fit", "--config",
                             str(root / "configs" / "quickstart.yaml"), "--config", str(overlay),
                             f"--trainer.default_root_dir={tmp_path / 'run'}"], env=env, capture_output=True,
                            text=True, timeout=180)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
    run = tmp_path / "run"
    assert not run.exists() or not any(run.rglob("*"))  # no config, log or checkpoint written


def test_mixture_metrics_under_sharding_need_equal_shares():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_diffusion import DiffusionLightningModule
    from lightning_diffusion.callbacks import GaussianMixtureMetrics
    from lightning_diffusion.data import GaussianMixture

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), world_size=2, datamodule=None)
    callback = GaussianMixtureMetrics(mixture=GaussianMixture.digits(), eval_size=1001)
    module = DiffusionLightningModule(EDM2UNet(model_channels=16))
    with pytest.raises(ValueError, match=r"eval_size=1001: under sharded training .* multiple of the 2 processes"):
        callback.setup(trainer, module, "fit")
