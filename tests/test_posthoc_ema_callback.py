"""PostHocEMA callback: once per optimizer step, exact resume, snapshots, EMA validation, DDP."""

from __future__ import annotations

import functools
import json
import os
import shutil

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer, tiny_unet
from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.callbacks import PostHocEMA
from lightning_diffusion.ema import list_snapshots, reconstruct

ADAM = functools.partial(torch.optim.Adam, lr=2e-3)
BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _module() -> DiffusionLightningModule:
    torch.manual_seed(0)
    return DiffusionLightningModule(tiny_unet(), optimizer=ADAM)


def _loader(n: int = 16) -> DataLoader:
    # Every batch is the same image: the data order cannot differ between a straight and a resumed run.
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    return DataLoader(TensorDataset(image.expand(n, 1, 8, 8).clone()), batch_size=BATCH)


def _ema_tensors(cb: PostHocEMA) -> list[torch.Tensor]:
    return [a for avg in cb.ema.averages for a in avg]


@pytest.mark.parametrize("k", [1, 2])
def test_updates_once_per_optimizer_step_with_accumulation(k):
    cb = PostHocEMA(update_every_n_steps=k)
    quiet_trainer(max_steps=6, accumulate_grad_batches=2, limit_val_batches=0,
                  callbacks=[cb]).fit(_module(), _loader(32))
    assert cb.ema.num_updates == 6 // k and cb.ema.nimg == 6 * BATCH * 2  # 12 micro-batches


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="sigma_rels=0.3"):
        PostHocEMA(sigma_rels=(0.05, 0.3))
    with pytest.raises(ValueError, match="validate_with=0.2"):
        PostHocEMA(validate_with=0.2)
    with pytest.raises(ValueError, match="snapshot_dtype='bf16'"):
        PostHocEMA(snapshot_dtype="bf16")


def _fit(tmp_path, name, max_steps, ckpt_path=None, every_n_train_steps=None):
    cb = PostHocEMA(snapshot_every_nimg=2 * BATCH, dirpath=str(tmp_path / name / "phema"))
    callbacks = [cb]
    if every_n_train_steps:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / name / "ckpt", every_n_train_steps=every_n_train_steps,
                                         save_top_k=-1, filename="{step}"))
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=callbacks,
                            enable_checkpointing=bool(every_n_train_steps))
    trainer.fit(_module(), _loader(), ckpt_path=ckpt_path)
    return cb, trainer


def test_resume_is_bit_identical_and_keeps_snapshots(tmp_path):
    straight, _ = _fit(tmp_path, "a", 8)
    first, _ = _fit(tmp_path, "b", 4, every_n_train_steps=2)
    step2 = tmp_path / "b" / "ckpt" / "step=2.ckpt"
    raw = torch.load(step2, weights_only=True)  # plain state only
    assert raw["callbacks"]["PostHocEMA"]["last_nimg"] == 2 * BATCH
    kept = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "b" / "phema").glob("phema-*.pt")}
    assert len(kept) == 4  # snapshots at 16 and 32 images, two profiles each
    resumed, _ = _fit(tmp_path, "b", 8, ckpt_path=step2)  # resumes behind the written snapshots
    assert resumed.ema.num_updates == straight.ema.num_updates == 8
    for a, b in zip(_ema_tensors(straight), _ema_tensors(resumed)):
        assert torch.equal(a, b)
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept  # never rewritten
    files = sorted(p.name for p in (tmp_path / "b" / "phema").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "a" / "phema").iterdir())  # no temp files either
    manifest = json.loads((tmp_path / "b" / "phema" / "manifest.json").read_text())["snapshots"]
    assert sorted(e["file"] for e in manifest) == [f for f in files if f.startswith("phema-")]
    assert [e["nimg"] for e in manifest] == [16, 16, 32, 32, 48, 48, 64, 64]
    for x, y in zip(list_snapshots(tmp_path / "a" / "phema"), list_snapshots(tmp_path / "b" / "phema")):
        a, b = (torch.load(e["file"], weights_only=True)["state_dict"] for e in (x, y))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = reconstruct([e["file"] for e in list_snapshots(tmp_path / "a" / "phema")], [0.10])[0]
    for key, value in straight.ema.profile_state_dict(1).items():
        torch.testing.assert_close(last["net." + key], value.float(), rtol=1e-5, atol=1e-6)


def test_resume_whose_earlier_folder_is_gone_lists_only_the_snapshots_it_has(tmp_path):
    # Default folder (no dirpath): a resume continues in the folder of the checkpoint's run when it is
    # there (tests/test_crash_resume.py); when it is not (checkpoint moved), in its own, whose manifest
    # must not list the earlier run's files.
    cb = PostHocEMA(snapshot_every_nimg=2 * BATCH)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[cb, ckpt], enable_checkpointing=True,
                  default_root_dir=tmp_path / "a").fit(_module(), _loader())
    assert cb._directory == tmp_path / "a" / "phema" and len(list(cb._directory.glob("phema-*.pt"))) == 4
    saved = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=True)["callbacks"]["PostHocEMA"]
    assert saved["directory"] == str((tmp_path / "a" / "phema").resolve())
    shutil.rmtree(tmp_path / "a")
    resumed = PostHocEMA(snapshot_every_nimg=2 * BATCH)
    quiet_trainer(max_steps=8, limit_val_batches=0, callbacks=[resumed], default_root_dir=tmp_path / "b").fit(
        _module(), _loader(), ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    assert resumed._directory == tmp_path / "b" / "phema"
    manifest = json.loads((tmp_path / "b" / "phema" / "manifest.json").read_text())["snapshots"]
    assert [e["nimg"] for e in manifest] == [32, 32, 48, 48, 64, 64]  # 16 was written to the folder that is gone
    assert all((tmp_path / "b" / "phema" / e["file"]).is_file() for e in manifest)
    assert len(resumed.snapshots) == 8  # the run's own record still knows all of them


def test_resume_from_before_the_first_snapshot_continues_in_the_runs_folder(tmp_path):
    # The checkpoint of step 2 comes before the first snapshot (step 3): its folder was never made,
    # but the run's log folder is still here, so the resumed run writes there (not in a second
    # folder beside a snapshot the crashed run may have written after that checkpoint).
    cb = PostHocEMA(snapshot_every_nimg=3 * BATCH)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a" / "ckpt", every_n_train_steps=2, save_top_k=1, filename="{step}")
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[cb, ckpt], enable_checkpointing=True,
                  default_root_dir=tmp_path / "a").fit(_module(), _loader())
    assert not (tmp_path / "a" / "phema").exists()
    saved = torch.load(tmp_path / "a" / "ckpt" / "step=2.ckpt", weights_only=True)["callbacks"]["PostHocEMA"]
    assert saved["directory"] == str((tmp_path / "a" / "phema").resolve())
    resumed = PostHocEMA(snapshot_every_nimg=3 * BATCH)
    quiet_trainer(max_steps=6, limit_val_batches=0, callbacks=[resumed], default_root_dir=tmp_path / "b").fit(
        _module(), _loader(), ckpt_path=tmp_path / "a" / "ckpt" / "step=2.ckpt")
    assert resumed._directory == (tmp_path / "a" / "phema").resolve()
    assert sorted(p.name for p in resumed._directory.glob("phema-*.pt")) == sorted(
        e["file"] for e in resumed.snapshots) and len(resumed.snapshots) == 4  # steps 3 and 6, two profiles
    assert not (tmp_path / "b" / "phema").exists()


class _Probe(pl.Callback):
    """Placed after PostHocEMA: records what the network holds inside and after validation."""

    def __init__(self, ema_cb: PostHocEMA):
        self.ema_cb, self.inside, self.after = ema_cb, [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        expected = self.ema_cb.ema.profile_state_dict(1)
        self.inside.append(all(torch.equal(v, expected[k]) for k, v in pl_module.net.state_dict().items()))

    def on_validation_end(self, trainer, pl_module):
        self.after.append(self.ema_cb.ema.swapped)


def test_validation_swaps_in_and_always_back(tmp_path):
    cb = PostHocEMA(validate_with=0.10)
    probe = _Probe(cb)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = _module()
    trainer = quiet_trainer(max_steps=6, limit_val_batches=1, num_sanity_val_steps=1, enable_checkpointing=True,
                            callbacks=[cb, probe, ckpt])
    trainer.fit(module, _loader(), _loader())
    assert probe.inside[1:] == [True] * 3 and probe.after == [False] * 4  # sanity check ran on raw weights
    saved = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    for k, v in module.state_dict().items():
        assert torch.equal(saved[k], v)  # the checkpoint holds the raw weights
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.validate(module, _loader(), verbose=False)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    fresh = PostHocEMA(validate_with=1)
    with pytest.raises(ValueError, match="no update yet"):
        quiet_trainer(callbacks=[fresh], limit_val_batches=1).validate(_module(), _loader(), verbose=False)
    assert not fresh.ema.swapped



def test_phema_tool_rebuilds_a_checkpoint_validate_accepts(tmp_path, capsys):
    from lightning_diffusion.phema_tool import main

    cb = PostHocEMA(snapshot_every_nimg=2 * BATCH, dirpath=str(tmp_path / "phema"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    quiet_trainer(max_steps=6, limit_val_batches=0, enable_checkpointing=True,
                  callbacks=[cb, ckpt]).fit(_module(), _loader())
    main(["list", str(tmp_path)])
    assert capsys.readouterr().out.count("phema-") == 6
    main(["rebuild", str(tmp_path), "--sigma_rel", "0.10", "0.15", "--out", str(tmp_path / "out")])
    paths = capsys.readouterr().out.split()
    assert [p.rsplit("-", 1)[-1] for p in paths] == ["0.1000.ckpt", "0.1500.ckpt"]
    raw = torch.load(paths[0], weights_only=True)
    assert "optimizer_states" not in raw and "PostHocEMA" not in raw["callbacks"] and raw["phema"]["nimg"] == 48
    for key, value in cb.ema.profile_state_dict(1).items():  # 0.10 at the last snapshot is stored
        torch.testing.assert_close(raw["state_dict"]["net." + key], value, rtol=1e-5, atol=1e-6)
    module = _module()
    quiet_trainer(limit_val_batches=1).validate(module, _loader(), ckpt_path=paths[1], verbose=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["rebuild", str(tmp_path), "--sigma_rel", "0.3"])
    assert exit_info.value.code == 2 and "sigma_rel" in capsys.readouterr().err


class _DumpEMA(pl.Callback):
    """Each DDP rank saves its EMA tensors (ddp_spawn: the parent never sees the workers' objects)."""

    def __init__(self, ema_cb: PostHocEMA, directory: str):
        self.ema_cb, self.directory = ema_cb, directory

    def on_train_end(self, trainer, pl_module):
        torch.save(self.ema_cb.state_dict()["ema"], os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


@pytest.mark.timeout(120)
def test_ddp_ranks_hold_identical_ema_and_rank0_writes_once(tmp_path):
    cb = PostHocEMA(snapshot_every_nimg=4 * BATCH, dirpath=str(tmp_path / "phema"))
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, devices=2, strategy="ddp_spawn",
                            callbacks=[cb, _DumpEMA(cb, str(tmp_path))])
    trainer.fit(_module(), _loader(32))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["nimg"] == ranks[1]["nimg"] == 4 * BATCH * 2 and ranks[0]["num_updates"] == 4
    for a, b in zip(ranks[0]["averages"], ranks[1]["averages"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    files = sorted(p.name for p in (tmp_path / "phema").iterdir())
    assert files == ["manifest.json", "phema-000000000032-0.0500.pt", "phema-000000000032-0.1000.pt",
                     "phema-000000000064-0.0500.pt", "phema-000000000064-0.1000.pt"]
