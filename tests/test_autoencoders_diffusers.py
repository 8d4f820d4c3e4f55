"""DiffusersAutoencoder: diffusers' AutoencoderKL from a local folder behind the autoencoder interface.

Every test builds a tiny randomly initialized AutoencoderKL (two blocks of 8 and 16 channels, factor 2)
and saves it into tmp_path, so nothing is downloaded and each test takes well under a second.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from lightning_diffusion.autoencoders.base import build_autoencoder, encode_batch
# importing the module registers "DiffusersAutoencoder" for build_autoencoder
from lightning_diffusion.autoencoders.diffusers import DiffusersAutoencoder


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         norm_num_groups=8, latent_channels=4, sample_size=16).eval()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[AutoencoderKL, Path]:
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")  # safetensors by default
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    return vae, tmp_path / "vae"


def images(batch: int = 2, side: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_sizes_and_shapes(saved):
    _, folder = saved
    autoencoder = DiffusersAutoencoder(str(folder)).frozen()
    assert (autoencoder.image_channels, autoencoder.latent_channels, autoencoder.downsample) == (3, 4, 2)
    assert autoencoder.latent_shape((3, 16, 24)) == (4, 8, 12)
    mean, std = autoencoder.encode(images())
    assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == std.dtype == torch.float32
    assert (std > 0).all()
    decoded = autoencoder.decode(mean)
    assert decoded.shape == (2, 3, 16, 16) and decoded.dtype == torch.float32
    assert not any(parameter.requires_grad for parameter in autoencoder.parameters())
    with pytest.raises(ValueError, match="not divisible by its downsampling factor 2"):
        autoencoder.encode(images(side=15))
    with pytest.raises(ValueError, match=r"give \[B,4,h,w\] latents"):
        autoencoder.decode(torch.zeros(1, 3, 8, 8))


def test_matches_diffusers_unscaled(saved):
    """Same moments and decodings as diffusers itself: no scaling_factor/shift_factor is applied."""
    vae, folder = saved
    autoencoder = DiffusersAutoencoder(folder).frozen()
    x = images()
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mean, std = autoencoder.encode(x)
        torch.testing.assert_close(mean, posterior.mean)
        torch.testing.assert_close(std, posterior.std)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(autoencoder.decode(latents), vae.decode(latents).sample)
    mean_batch, std_batch = encode_batch(autoencoder, x)  # the library's shape-checked path
    torch.testing.assert_close(mean_batch, mean)
    torch.testing.assert_close(std_batch, std)


def test_spec_round_trip(saved, tmp_path, monkeypatch):
    _, folder = saved
    monkeypatch.chdir(tmp_path)
    autoencoder = DiffusersAutoencoder("vae").frozen()  # relative: the spec must not depend on the cwd
    spec = autoencoder.spec()
    assert spec == {"name": "DiffusersAutoencoder",
                    "args": {"path": str(folder.resolve()), "subfolder": None, "dtype": "float32"}}
    assert json.loads(json.dumps(spec)) == spec  # plain data, as manifests store it
    monkeypatch.chdir(Path(__file__).parent)
    rebuilt = build_autoencoder(json.loads(json.dumps(spec)))
    assert isinstance(rebuilt, DiffusersAutoencoder) and not rebuilt.training
    x = images()
    with torch.no_grad():
        for one, other in zip(autoencoder.encode(x), rebuilt.encode(x)):
            torch.testing.assert_close(one, other, rtol=0, atol=0)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(autoencoder.decode(latents), rebuilt.decode(latents), rtol=0, atol=0)


def test_subfolder(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "pipeline" / "vae")
    autoencoder = DiffusersAutoencoder(tmp_path / "pipeline", subfolder="vae")
    assert autoencoder.spec()["args"] == {"path": str(tmp_path / "pipeline"), "subfolder": "vae", "dtype": "float32"}
    assert build_autoencoder(autoencoder.spec()).encode(images())[0].shape == (2, 4, 8, 8)


def test_bfloat16(saved):
    vae, folder = saved
    autoencoder = DiffusersAutoencoder(folder, dtype="bfloat16").frozen()
    assert next(autoencoder.vae.parameters()).dtype == torch.bfloat16
    assert autoencoder.spec()["args"]["dtype"] == "bfloat16"
    x = images()
    mean, std = autoencoder.encode(x)  # float32 in, cast to bfloat16 inside, float32 out
    assert mean.dtype == std.dtype == torch.float32
    decoded = autoencoder.decode(mean)
    assert decoded.dtype == torch.float32 and decoded.shape == (2, 3, 16, 16)
    with torch.no_grad():
        reference = vae.encode(x).latent_dist.mean
    assert (mean - reference).abs().max() < 0.1 * reference.abs().max() + 0.05  # bfloat16 keeps ~3 digits


def test_bin_only_folder_loads_plain_tensors(tmp_path):
    """diffusers reads a .bin with torch.load(weights_only=True): plain tensors load, and match."""
    vae = tiny_vae()
    vae.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.bin"]
    autoencoder = DiffusersAutoencoder(tmp_path).frozen()
    with torch.no_grad():
        torch.testing.assert_close(autoencoder.encode(images())[0], vae.encode(images()).latent_dist.mean)


def _ran(marker: str) -> None:
    Path(marker).write_text("code from the weights file ran")


class _Crafted:
    """Unpickling this calls ``_ran``: what a malicious .bin would do with os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return _ran, (self.marker,)


def test_crafted_bin_is_refused_without_running(tmp_path):
    tiny_vae().save_pretrained(tmp_path, safe_serialization=False)
    marker = tmp_path / "ran.txt"
    torch.save({"encoder.conv_in.weight": _Crafted(str(marker))}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"DiffusersAutoencoder\.path: .* convert them to safetensors"):
        DiffusersAutoencoder(tmp_path)
    assert not marker.exists()


def test_missing_folder_fails_before_diffusers(tmp_path, monkeypatch):
    import diffusers

    def no_call(*args, **kwargs):
        raise AssertionError("diffusers was called for a missing folder")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", no_call)
    # a hub id is not a local folder: refused, never downloaded
    for path in (tmp_path / "absent", "stabilityai/sd-vae-ft-mse"):
        with pytest.raises(FileNotFoundError, match=r"^DiffusersAutoencoder\.path: .* is not an existing folder"):
            DiffusersAutoencoder(path)
    with pytest.raises(FileNotFoundError, match="is not an existing folder"):
        DiffusersAutoencoder(tmp_path, subfolder="vae")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"^DiffusersAutoencoder\.path: .* has no config\.json"):
        DiffusersAutoencoder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        DiffusersAutoencoder(tmp_path)


def test_wrong_model(saved, tmp_path):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="holds a UNet2DModel, not an AutoencoderKL"):
        DiffusersAutoencoder(folder)
    # configs that do not fit the weights: other sizes fail to load, extra layers are not kept random
    del config["_class_name"]
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 32]}))
    with pytest.raises(ValueError, match=r"does not hold a loadable diffusers AutoencoderKL \(Error\(s\) in loading "
                                         r"state_dict for AutoencoderKL: size mismatch"):
        DiffusersAutoencoder(folder)
    (folder / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(ValueError, match=r"^DiffusersAutoencoder\.path: the weights in .* do not fit its config "
                                         r"\(\d+ tensors missing"):
        DiffusersAutoencoder(folder)
    # a config without weights
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^DiffusersAutoencoder\.path: .* does not hold a loadable"):
        DiffusersAutoencoder(empty)


def test_bad_dtype(saved):
    _, folder = saved
    with pytest.raises(ValueError, match=r"^DiffusersAutoencoder\.dtype: 'float64' is not supported; give one of"):
        DiffusersAutoencoder(folder, dtype="float64")
