"""``lightning-diffusion encode``: images -> latent shards (docs/latents.md).

    lightning-diffusion encode --source digits --autoencoder digits --out data/latents/digits
    lightning-diffusion encode --source ~/imagenet/train --image-size 512 \\
        --autoencoder ~/models/sd-vae-ft-mse --out data/latents/imagenet512 --devices 8

Shards of ``--shard-size`` images are encoded in batches, each written atomically; a shard that
exists is skipped, so an interrupted encode run again continues where it stopped and gives the
same bytes. With ``--devices N`` the shards are dealt round-robin over N processes (GPUs, or CPU
processes over gloo) and rank 0 writes the normalization once all are done. A bad setting is one
``error:`` line and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lightning_diffusion.autoencoders import Autoencoder, autoencoder_from_option
from lightning_diffusion.autoencoders.base import encode_batch
from lightning_diffusion.data.image_sources import ImageSource, open_source
from lightning_diffusion.data.latent_shards import (FORMAT, MANIFEST, NORMALIZATION, STORAGE_DTYPES, LatentShards,
                                                    normalization_stats, read_json, shard_files, shard_sizes,
                                                    write_json, write_shard)

__all__ = ["encode", "main"]


def manifest_for(source: ImageSource, autoencoder: Autoencoder, shard_size: int, dtype: str) -> dict[str, Any]:
    """What the folder will hold; a resumed encode must describe the same thing."""
    return {"format": FORMAT, "autoencoder": autoencoder.spec(), "source": source.describe(),
            "count": len(source), "shard_size": shard_size,
            "latent_shape": list(autoencoder.latent_shape(source.image_shape)), "dtype": dtype}


def check_resumable(out: Path, manifest: dict[str, Any], setting: str = "--out") -> None:
    """Refuse a folder that holds another encode's shards (continuing it would mix two data sets)."""
    if not (out / MANIFEST).is_file():
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"{setting}: '{out}' is a non-empty folder without a {MANIFEST}; give an empty or new "
                             "folder.")
        return
    previous = read_json(out / MANIFEST, setting)
    differing = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
    if differing:
        raise ValueError(f"{setting}: '{out}' holds another encode ({', '.join(differing)} differ); give a new "
                         "folder, or the same settings to continue it.")


def encode(
    source: ImageSource,
    autoencoder: Autoencoder,
    out: str | Path,
    batch_size: int = 64,
    shard_size: int = 4096,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> Path:
    """Encode ``source`` into shards under ``out`` (this rank's share), then rank 0 writes the normalization."""
    out = Path(out).expanduser()
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"--batch-size/--shard-size: got {batch_size}/{shard_size}; give positive integers.")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype: got {dtype!r}; give one of {list(STORAGE_DTYPES)}.")
    manifest = manifest_for(source, autoencoder, shard_size, dtype)
    check_resumable(out, manifest)
    barrier()  # every rank checked the folder before rank 0 writes in it
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MANIFEST).is_file():
            write_json(out / MANIFEST, manifest)
    barrier()
    sizes = shard_sizes(len(source), shard_size)
    todo = [i for i in range(rank, len(sizes), world_size) if not shard_files(out, i)[0].is_file()]
    autoencoder = autoencoder.to(device)
    with _progress(progress and rank == 0, sum(sizes[i] for i in todo) * world_size) as advance:
        for index in todo:
            start = index * shard_size
            means, stds = [], []
            for batch_start in range(start, start + sizes[index], batch_size):
                images, _ = source.read(batch_start, min(batch_start + batch_size, start + sizes[index]))
                mean, std = encode_batch(autoencoder, images.to(device))
                means.append(mean.cpu().numpy())
                stds.append(std.cpu().numpy())
                advance(images.shape[0] * world_size)
            labels = source.labels[start : start + sizes[index]].numpy()
            write_shard(out, index, np.concatenate(means), np.concatenate(stds), labels, dtype)
    barrier()
    if rank == 0 and not (out / NORMALIZATION).is_file():
        write_json(out / NORMALIZATION, normalization_stats(LatentShards(out, "--out")))
    barrier()
    return out


class _progress:
    """A Rich progress bar over images (rank 0 only); a no-op when off or when nothing is left."""

    def __init__(self, show: bool, total: int) -> None:
        self.show, self.total = show and total > 0, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("encode"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                            TimeRemainingColumn())
        self.bar.start()
        task = self.bar.add_task("encode", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.show:
            self.bar.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-diffusion encode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--source", required=True,
                   help="'digits', a .npy/.npz file, a CIFAR-10 cifar-10-batches-py folder or a folder of images")
    p.add_argument("--autoencoder", required=True,
                   help="'digits' (the shipped one) or a local diffusers AutoencoderKL folder (e.g. the SD VAE)")
    p.add_argument("--subfolder", default=None, help="diffusers: the VAE's subfolder (e.g. 'vae' of a pipeline)")
    p.add_argument("--autoencoder-dtype", default="float32", help="diffusers: float32, bfloat16 or float16")
    p.add_argument("--out", required=True, help="folder of the shards (created; an interrupted encode continues)")
    p.add_argument("--image-size", type=int, default=None, help="center-crop and resize to this square side")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="image folders: 1 grey or 3 RGB")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.add_argument("--dtype", default="float32", choices=list(STORAGE_DTYPES), help="storage of the moments")
    p.add_argument("--devices", type=int, default=1, help="processes per node (GPUs, or CPU processes over gloo)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (under torchrun or SLURM, as for fit)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``lightning-diffusion encode ...``); exit 2 with one line on a bad setting."""
    parser = _parser()
    parser.error = _one_line_error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    existed = out.exists()
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size: got {args.image_size}; give a positive integer.")
    if args.devices < 1 or args.num_nodes < 1:
        parser.error(f"--devices/--num-nodes: got {args.devices}/{args.num_nodes}; give positive integers.")
    try:
        source = open_source(args.source, args.channels, args.image_size, setting="--source")
        autoencoder = autoencoder_from_option(args.autoencoder, args.subfolder, args.autoencoder_dtype,
                                              setting="--autoencoder")
        autoencoder.latent_shape(source.image_shape)  # images that do not fit it: refused before any file
        fabric = _fabric(args.accelerator, args.devices, args.num_nodes)
        encode(source, autoencoder, out, args.batch_size, args.shard_size, args.dtype, fabric.device,
               fabric.global_rank, fabric.world_size, fabric.barrier, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing left on disk by a refused encode
        parser.error(str(error))
    if fabric.global_rank == 0:
        print(f"encoded {len(source)} images into {out} ({NORMALIZATION} written)")


def _one_line_error(message: str) -> None:
    print(f"lightning-diffusion encode: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _fabric(accelerator: str, devices: int, num_nodes: int) -> Any:
    """One process, or ``devices`` x ``num_nodes`` processes under DDP (launched like a Lightning fit)."""
    from lightning.fabric import Fabric

    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    strategy = "ddp" if devices * num_nodes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1 else "auto"
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch()
    return fabric


if __name__ == "__main__":
    main(sys.argv[1:])
