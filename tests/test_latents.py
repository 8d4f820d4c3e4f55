"""Latent diffusion's data path (docs/latents.md): encode -> shards -> LatentDataModule -> fit -> decode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_diffusion import DiffusionLightningModule
from lightning_diffusion.autoencoders import DigitsAutoencoder, LatentSpace
from lightning_diffusion.data import LatentDataModule
from lightning_diffusion.data.image_sources import open_source
from lightning_diffusion.data.latent_shards import NORMALIZATION, LatentShards, read_json, shard_files
from lightning_diffusion.encode import encode
from lightning_diffusion.networks import UNet

SHARD = 256  # 1,797 digits -> 8 shards, the last one of 5


def _encode(out: Path, **kwargs) -> Path:
    return encode(open_source("digits"), DigitsAutoencoder(), out, batch_size=100, shard_size=SHARD,
                  progress=False, **kwargs)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    return _encode(tmp_path_factory.mktemp("latents") / "digits")


def _all_moments(root: Path) -> tuple[np.ndarray, np.ndarray]:
    shards = LatentShards(root)
    return shards.moments(np.arange(len(shards)))


def test_shards_hold_the_autoencoders_moments_and_labels(encoded):
    shards = LatentShards(encoded)
    assert len(shards) == 1797 and shards.latent_shape == (4, 4, 4) and shards.num_classes == 10
    source = open_source("digits")
    images, labels = source.read(0, 1797)
    with torch.no_grad():
        mean, std = DigitsAutoencoder().encode(images)
    got_mean, got_std = _all_moments(encoded)
    np.testing.assert_allclose(got_mean, mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(got_std, std.numpy(), atol=1e-6)
    np.testing.assert_array_equal(shards.labels, labels.numpy())
    # any order of indices, across shard boundaries
    index = np.array([1796, 0, 255, 256, 1000])
    np.testing.assert_array_equal(shards.moments(index)[0], got_mean[index])


def test_normalization_matches_a_direct_computation(encoded):
    stats = read_json(encoded / NORMALIZATION, "test")
    mean, std = (a.astype(np.float64) for a in _all_moments(encoded))
    # eq. 8.1 against latents actually drawn: z = mean + std * noise, 64 draws of the whole set
    rng = np.random.default_rng(0)
    z = np.concatenate([mean + std * rng.standard_normal(mean.shape) for _ in range(64)])
    np.testing.assert_allclose(stats["mean"], z.mean(axis=(0, 2, 3)), atol=3e-3 * np.max(stats["std"]))
    np.testing.assert_allclose(stats["std"], z.std(axis=(0, 2, 3)), rtol=5e-3)
    assert min(np.asarray(stats["std"]) / np.sqrt((mean ** 2).mean(axis=(0, 2, 3)) - mean.mean(axis=(0, 2, 3)) ** 2)) > 1.0


def test_interrupted_encode_resumes_to_identical_bytes(encoded, tmp_path, monkeypatch):
    import lightning_diffusion.encode as encode_module

    calls = {"n": 0}
    real = encode_module.write_shard

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a Ctrl-C between two shards
        return real(*args, **kwargs)

    monkeypatch.setattr(encode_module, "write_shard", crash_on_third)
    out = tmp_path / "digits"
    with pytest.raises(KeyboardInterrupt):
        _encode(out)
    assert shard_files(out, 1)[0].is_file() and not shard_files(out, 2)[0].is_file()
    assert not (out / NORMALIZATION).exists()
    with pytest.raises(FileNotFoundError, match="normalization.json"):
        LatentDataModule(str(out))
    monkeypatch.setattr(encode_module, "write_shard", real)
    _encode(out)
    names = sorted(p.name for p in encoded.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (encoded / name).read_bytes(), name


def test_training_latents_are_normalized_noisy_draws_keyed_by_epoch(encoded):
    dm = LatentDataModule(str(encoded), batch_size=64, target_std=0.5)
    dm.setup("fit")
    train = dm.train_dataset
    n = len(train)
    x = train.__getitems__(list(range(n)))[0]
    # eq. 8.2: per-channel mean 0 and std target_std over an epoch (the split holds 90% of the set)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.05)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.full((4,), 0.5), rtol=0.05)
    again = train.__getitems__([3, n + 3, 3])[0]
    assert torch.equal(again[0], again[2]) and not torch.equal(again[0], again[1])  # same epoch, next epoch
    space = dm.latent_space
    mean, std = LatentShards(encoded).moments(train.indices[[3]])
    noise = (space.denormalize(again[:1]) - torch.from_numpy(mean)) / torch.from_numpy(std)
    assert 0.5 < noise.std() < 1.6  # the draw is mean + std * noise with unit noise
    val = dm.val_dataset.__getitems__([0, 1])[0]
    mean, _ = LatentShards(encoded).moments(dm.val_dataset.indices[:2])
    assert torch.allclose(val, space.normalize(torch.from_numpy(mean)))


def _module(**kwargs) -> DiffusionLightningModule:
    net = UNet(in_channels=4, image_size=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), num_classes=10)
    return DiffusionLightningModule(net, prediction="v", num_classes=10, sample_steps=4, **kwargs)


def test_fit_then_checkpoint_decodes_digits(encoded, tmp_path):
    dm = LatentDataModule(str(encoded), batch_size=64)
    module = _module(fd_samples=64)
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, val_check_interval=30,
                         limit_val_batches=2, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val/fd"])
    images = module.sample(6, class_labels=torch.arange(6), generator=torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 8, 8) and images.abs().max() <= 1
    latents = module.sample(6, class_labels=torch.arange(6), generator=torch.Generator().manual_seed(0), decode=False)
    assert latents.shape == (6, 4, 4, 4)
    assert torch.allclose(images, module.decoded(latents).clamp(-1, 1), atol=1e-6)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["diffusion"]["latents"]
    assert state["autoencoder"] == {"name": "DigitsAutoencoder", "args": {}}
    restored = DiffusionLightningModule.load_from_checkpoint(path, net=module.net)
    assert restored.latent_space.same_as(dm.latent_space)
    again = restored.sample(6, class_labels=torch.arange(6), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(again, images, atol=1e-5)


def test_checkpoint_refuses_data_of_another_normalization(encoded, tmp_path):
    module = _module()
    module.latent_space = LatentSpace(DigitsAutoencoder(), [0.0] * 4, [1.0] * 4)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    path = tmp_path / "other.ckpt"
    trainer.save_checkpoint(path)
    fresh = _module()
    with pytest.raises(ValueError, match="Latent space: the checkpoint uses"):
        pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path).fit(
            fresh, datamodule=LatentDataModule(str(encoded), batch_size=64), ckpt_path=path)


def test_broken_shards_are_refused_in_one_sentence(encoded, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(encoded, broken)
    moments, labels = shard_files(broken, 2)
    np.save(labels, np.full(SHARD, 11, dtype=np.int64))
    with pytest.raises(ValueError, match="shard 2 .* has label 11, outside the manifest's 10 classes"):
        LatentShards(broken)
    np.save(labels, np.zeros(SHARD - 1, dtype=np.int64))
    with pytest.raises(ValueError, match="shard 2 .* the manifest says 256 latents"):
        LatentShards(broken)
    moments.unlink()
    with pytest.raises(FileNotFoundError, match="shard 2 of 8 is missing"):
        LatentShards(broken)
    with pytest.raises(FileNotFoundError, match="LatentDataModule.path: .* holds no finished encode"):
        LatentDataModule(str(tmp_path / "nothing"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_diffusion", "encode", *args], capture_output=True,
                          text=True, timeout=240)


def test_encode_command_refuses_bad_settings_and_leaves_nothing(encoded, tmp_path):
    out = tmp_path / "new"
    result = _cli("--source", "digits", "--autoencoder", str(tmp_path / "no_vae"), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--autoencoder" in result.stderr
    assert not out.exists()
    result = _cli("--source", str(tmp_path / "missing.npy"), "--autoencoder", "digits", "--out", str(out))
    assert result.returncode == 2 and "--source" in result.stderr and not out.exists()
    before = {p.name: p.read_bytes() for p in encoded.iterdir()}
    result = _cli("--source", "digits", "--autoencoder", "digits", "--out", str(encoded), "--shard-size", "100")
    assert result.returncode == 2 and "holds another encode (count" not in result.stderr
    assert "shard_size differ" in result.stderr
    assert {p.name: p.read_bytes() for p in encoded.iterdir()} == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_process_encode_writes_the_same_latents(encoded, tmp_path):
    out = tmp_path / "ddp"
    result = _cli("--source", "digits", "--autoencoder", "digits", "--out", str(out), "--shard-size", str(SHARD),
                  "--batch-size", "100", "--devices", "2", "--accelerator", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in encoded.iterdir())
    assert (out / "latents.json").read_bytes() == (encoded / "latents.json").read_bytes()
    # The same numbers; not always the same bits: each rank runs with its own CPU thread count,
    # which changes the convolution's summation order for some batch shapes.
    for one, two in zip(_all_moments(encoded), _all_moments(out)):
        np.testing.assert_allclose(one, two, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(LatentShards(out).labels, LatentShards(encoded).labels)
    for key in ("mean", "std"):
        np.testing.assert_allclose(read_json(out / NORMALIZATION, "")[key], read_json(encoded / NORMALIZATION, "")[key],
                                   rtol=1e-6)


def test_latents_that_do_not_fit_the_network_are_refused_before_training(encoded, tmp_path):
    net = UNet(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=())  # a pixel-space net: 1x8x8, the latents are 4x4x4
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="in_channels"):
        trainer.fit(DiffusionLightningModule(net), datamodule=LatentDataModule(str(encoded), batch_size=64))
    assert trainer.global_step == 0


def test_folder_and_array_sources_encode_what_they_hold(tmp_path):
    from PIL import Image

    digits = open_source("digits")
    images, labels = digits.read(0, 12)
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
        folder = tmp_path / "folder" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    np.save(tmp_path / "digits.npy", pixels)
    reference = DigitsAutoencoder().encode(torch.from_numpy(pixels).unsqueeze(1).float() / 127.5 - 1.0)[0].detach()
    for spec in (str(tmp_path / "digits.npy"), str(tmp_path / "folder")):
        source = open_source(spec, channels=1)
        out = encode(source, DigitsAutoencoder(), tmp_path / f"{Path(spec).stem}_latents", batch_size=5, shard_size=7,
                     progress=False)
        shards = LatentShards(out)
        mean, _ = shards.moments(np.arange(len(shards)))
        if spec.endswith(".npy"):
            assert shards.num_classes == 0 and not shards.labels.any()
            np.testing.assert_allclose(mean, reference.numpy(), atol=1e-5)
        else:  # files sorted by class folder, then name; the subfolders are the classes
            classes = sorted({f"class_{label}" for label in labels.tolist()})
            assert shards.num_classes == len(classes)
            files = sorted((tmp_path / "folder").rglob("*.png"))
            expected = [classes.index(f.parent.name) for f in files]
            np.testing.assert_array_equal(shards.labels, expected)
            order = [int(f.stem) for f in files]
            np.testing.assert_allclose(mean, reference.numpy()[order], atol=1e-5)


def test_cifar_folder_encodes_through_a_diffusers_autoencoder(tmp_path):
    from test_autoencoders_diffusers import tiny_vae  # tests/ is on sys.path
    from test_data import write_fake_cifar

    from lightning_diffusion.autoencoders import DiffusersAutoencoder

    folder = write_fake_cifar(tmp_path, per_batch=6)  # 30 training images of 3x32x32, labels i % 10
    tiny_vae().save_pretrained(tmp_path / "vae")
    source = open_source(str(folder), image_size=16)
    assert len(source) == 30 and source.image_shape == (3, 16, 16) and source.num_classes == 10
    out = encode(source, DiffusersAutoencoder(str(tmp_path / "vae")), tmp_path / "latents", batch_size=8,
                 shard_size=16, progress=False)
    shards = LatentShards(out)
    assert shards.latent_shape == (4, 8, 8) and shards.labels.tolist() == [i % 10 for i in range(6)] * 5
    assert read_json(out / "latents.json", "")["autoencoder"]["name"] == "DiffusersAutoencoder"


def test_a_resumed_latent_fit_trains_on_the_same_latents(encoded, tmp_path):
    # The per-epoch latent draws are keyed by (seed, epoch, image), so a resume continues them exactly,
    # here after the first epoch (25 batches of 64 of the 1,617 training latents) has ended.
    def trainer(steps: int, root: Path, **kwargs) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, default_root_dir=root, **kwargs)

    torch.manual_seed(0)
    straight = _module()
    trainer(30, tmp_path / "a").fit(straight, datamodule=LatentDataModule(str(encoded), batch_size=64))
    torch.manual_seed(0)
    first = _module()
    interrupted = trainer(27, tmp_path / "b")
    interrupted.fit(first, datamodule=LatentDataModule(str(encoded), batch_size=64))
    interrupted.save_checkpoint(tmp_path / "b.ckpt")
    resumed = _module()
    trainer(30, tmp_path / "c").fit(resumed, datamodule=LatentDataModule(str(encoded), batch_size=64),
                                    ckpt_path=tmp_path / "b.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_cache_of_another_encode_is_refused_not_used(encoded, tmp_path):
    # encode_from on a folder that holds the digits encoded with shard size 256: the same settings reuse
    # it; another shard size (or source, or autoencoder) is another encode.
    same = LatentDataModule(str(encoded), encode_from="digits", autoencoder="digits", shard_size=SHARD)
    assert same._encode_args is None and same.channels == 4
    with pytest.raises(ValueError, match="LatentDataModule.path: .* holds another encode \\(shard_size differ\\)"):
        LatentDataModule(str(encoded), encode_from="digits", autoencoder="digits", shard_size=100)
