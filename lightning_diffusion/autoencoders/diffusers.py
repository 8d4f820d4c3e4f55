"""diffusers' ``AutoencoderKL`` (the Stable Diffusion family of VAEs) behind the autoencoder interface.

The VAE is read from a folder the user already has on disk (``save_pretrained`` output, or a
downloaded hub snapshot), never from the hub: shard manifests and checkpoints rebuild it from
:meth:`DiffusersAutoencoder.spec`, and rebuilding must neither download anything nor run code
from the folder. Weights load from ``diffusion_pytorch_model.safetensors`` when present (diffusers
prefers it); a folder with only ``diffusion_pytorch_model.bin`` is read by diffusers with
``torch.load(weights_only=True)``, which refuses any pickle that names code, so it is accepted too
(tests/test_autoencoders_diffusers.py checks that a crafted ``.bin`` is refused without running).

diffusers is an optional dependency (``pip install -e ".[latent]"``), imported only when a
:class:`DiffusersAutoencoder` is built, so the package imports without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_diffusion.autoencoders.base import Autoencoder, register_autoencoder

__all__ = ["DTYPES", "DiffusersAutoencoder"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_autoencoder("DiffusersAutoencoder")
class DiffusersAutoencoder(Autoencoder):
    """A diffusers ``AutoencoderKL`` loaded from a local folder: images in [-1, 1] <-> raw latents.

    ``encode`` returns the posterior's mean and std and ``decode`` takes latents in that same raw
    scale: the VAE's ``config.scaling_factor`` / ``shift_factor`` (0.18215 for SD 1.x) are NOT
    applied, because the library normalizes latents itself with per-channel statistics measured on
    the data set (docs/latents.md); applying both would scale twice.

    Sizes come from the VAE's config: ``image_channels = in_channels``, ``latent_channels``, and
    ``downsample = 2 ** (len(block_out_channels) - 1)`` (8 for the SD VAEs). ``dtype`` is the
    precision the VAE runs in; inputs are cast to it and to the VAE's device, outputs come back as
    float32. float16 can overflow in some VAEs (the SDXL one); bfloat16 or float32 are safer.

    Args:
        path: a local folder holding ``config.json`` and the weights. Never a hub id: download first.
        subfolder: folder inside ``path`` that holds the VAE (``"vae"`` for a full pipeline snapshot).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Example::

        # once, with network access:
        #   huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir ~/models/sd-vae-ft-mse
        autoencoder = DiffusersAutoencoder("~/models/sd-vae-ft-mse", dtype="bfloat16").frozen().to("cuda")
        mean, std = autoencoder.encode(images)  # images [B, 3, 256, 256] -> each [B, 4, 32, 32]
        reconstructions = autoencoder.decode(mean)  # [B, 3, 256, 256], about [-1, 1]
        autoencoder.spec()  # {"name": "DiffusersAutoencoder", "args": {"path": "/home/.../sd-vae-ft-mse", ...}}
    """

    def __init__(self, path: str, subfolder: str | None = None, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"DiffusersAutoencoder.dtype: {dtype!r} is not supported; give one of {sorted(DTYPES)}.")
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"DiffusersAutoencoder.path: {path!r} is not a path; give a local folder holding a "
                             "diffusers AutoencoderKL (config.json and weights).")
        if subfolder is not None and (not isinstance(subfolder, str) or not subfolder):
            raise ValueError(f"DiffusersAutoencoder.subfolder: {subfolder!r} is not a folder name; give the folder "
                             "inside path that holds the VAE (e.g. 'vae'), or None.")
        # absolute, so the spec stored in manifests and checkpoints does not depend on the working directory
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.subfolder = subfolder
        self.dtype_name = dtype
        folder = Path(self.path) / subfolder if subfolder is not None else Path(self.path)
        # checked here, before diffusers sees it: a missing folder would otherwise be taken for a hub id
        if not folder.is_dir():
            raise FileNotFoundError(f"DiffusersAutoencoder.path: '{folder}' is not an existing folder; download the "
                                    "VAE first (e.g. huggingface-cli download stabilityai/sd-vae-ft-mse "
                                    "--local-dir FOLDER) and give that folder.")
        _check_config(folder)
        try:
            import diffusers
        except ImportError as error:
            raise ImportError('DiffusersAutoencoder needs diffusers; install it with pip install -e ".[latent]" '
                              '(or pip install "diffusers>=0.30").') from error
        try:
            vae, info = diffusers.AutoencoderKL.from_pretrained(
                self.path, subfolder=subfolder, local_files_only=True, torch_dtype=DTYPES[dtype],
                # safetensors when the folder has it; else the .bin, which diffusers reads with
                # torch.load(weights_only=True) (saying so explicitly also keeps diffusers from
                # warning about "unsafe serialization" on its fallback)
                use_safetensors=_has_safetensors(folder),
                # diffusers' default (meta-device init) needs accelerate and only warns without it
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
                output_loading_info=True)
        except Exception as error:  # diffusers raises OSError, ValueError, RuntimeError, ... for a bad folder
            # the first line names the problem (torch's "Error(s) in loading state_dict ...:" the next)
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
            reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
            if _refused_pickle(error):  # torch's weights_only unpickler met a global the .bin names
                reason += "; .bin weights load as plain tensors only, so convert them to safetensors"
            raise ValueError(f"DiffusersAutoencoder.path: '{folder}' does not hold a loadable diffusers "
                             f"AutoencoderKL ({reason.rstrip('. ')}).") from error
        # diffusers only warns when weights are missing and keeps them random: a VAE that silently
        # encodes with random layers would poison every latent shard written with it
        missing = list(info.get("missing_keys", [])) + [str(key[0]) if isinstance(key, tuple) else str(key)
                                                        for key in info.get("mismatched_keys", [])]
        if missing:
            raise ValueError(f"DiffusersAutoencoder.path: the weights in '{folder}' do not fit its config "
                             f"({len(missing)} tensors missing or of another shape, e.g. {missing[0]!r}); give the "
                             "folder of a complete AutoencoderKL.")
        self.vae = vae
        self.image_channels = int(vae.config.in_channels)
        self.latent_channels = int(vae.config.latent_channels)
        # each encoder block but the last halves the side (SD: 4 blocks -> 8)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        # read from the parameters on each call: .to(device) or .to(dtype) on this module moves the VAE
        parameter = next(self.vae.parameters())
        return parameter.device, parameter.dtype

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the latent posterior, each ``[B, latent_channels, H / f, W / f]``, float32, unscaled."""
        if images.ndim != 4:
            raise ValueError(f"DiffusersAutoencoder: images have shape {tuple(images.shape)}; "
                             f"give [B,{self.image_channels},H,W] images.")
        self.latent_shape(tuple(images.shape[1:]))  # one sentence for wrong channels or sizes
        device, dtype = self._placement()
        posterior = self.vae.encode(images.to(device=device, dtype=dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, image_channels, h * f, w * f]`` in about [-1, 1] (not clamped), float32, from raw latents."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"DiffusersAutoencoder: latents have shape {tuple(latents.shape)}; "
                             f"give [B,{self.latent_channels},h,w] latents.")
        device, dtype = self._placement()
        return self.vae.decode(latents.to(device=device, dtype=dtype)).sample.float()

    def spec(self) -> dict[str, Any]:
        """``{"name": "DiffusersAutoencoder", "args": {"path": absolute path, "subfolder": ..., "dtype": ...}}``."""
        return {"name": "DiffusersAutoencoder",
                "args": {"path": self.path, "subfolder": self.subfolder, "dtype": self.dtype_name}}


def _has_safetensors(folder: Path) -> bool:
    """Whether ``folder`` holds diffusers' safetensors weights (one file, or an index of shards)."""
    return any((folder / name).is_file() for name in ("diffusion_pytorch_model.safetensors",
                                                       "diffusion_pytorch_model.safetensors.index.json"))


def _refused_pickle(error: BaseException) -> bool:
    """Whether ``error`` stems from an unpickling refusal (diffusers re-raises it as a plain OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, pickle.UnpicklingError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _check_config(folder: Path) -> None:
    """One sentence when ``folder`` has no AutoencoderKL config (read as JSON only: nothing in it runs)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"DiffusersAutoencoder.path: '{folder}' has no config.json; give the folder written by "
                         "AutoencoderKL.save_pretrained (or the 'vae' subfolder of a pipeline, via subfolder).")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"DiffusersAutoencoder.path: '{config_file}' is not valid JSON ({error}).") from error
    if not isinstance(config, dict):
        raise ValueError(f"DiffusersAutoencoder.path: '{config_file}' is not a diffusers config (not a JSON object).")
    # diffusers would build an AutoencoderKL with default sizes from another model's config and only
    # then fail on the weights (or silently keep random ones), so name the mismatch up front
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"DiffusersAutoencoder.path: '{folder}' holds a {class_name}, not an AutoencoderKL; give the "
                         "VAE's folder (for a pipeline snapshot, set subfolder='vae').")
    # a quantized VAE would route loading through a quantization backend and break the float32 outputs
    if config.get("quantization_config") is not None:
        raise ValueError(f"DiffusersAutoencoder.path: '{folder}' holds a quantized AutoencoderKL; give an "
                         "unquantized one (float32, bfloat16 or float16 weights).")
