"""Frechet Distance with the shipped digits feature net: accuracy, FD values, freezing, DDP sync."""

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_diffusion.data import DigitsDataModule
from lightning_diffusion.metrics import (
    DigitsFeatureNet,
    FrechetDistance,
    inception_fid,
    inception_fid_available,
    load_digits_feature_net,
)
from lightning_diffusion.metrics.feature_nets import DIGITS_WEIGHTS


@pytest.fixture(scope="module")
def digit_images() -> torch.Tensor:
    """All 1797 embedded digits, float [-1,1], [N,1,8,8], in a seeded random order."""
    dm = DigitsDataModule()
    images = torch.cat([dm.train_dataset.images, dm.val_dataset.images]).float() / 127.5 - 1.0
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


def noisy(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    """Images plus seeded Gaussian noise of the given std."""
    return images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between two image sets with the shipped digits net."""
    fd = FrechetDistance()
    fd.update(real, real=True)
    fd.update(fake, real=False)
    return fd.compute().item()


def test_feature_net_is_frozen_small_and_accurate() -> None:
    net = load_digits_feature_net()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert 20_000 < sum(p.numel() for p in net.parameters()) < 60_000
    assert DIGITS_WEIGHTS.stat().st_size < 200_000
    held_out = DigitsDataModule(val_fraction=0.2, seed=0).val_dataset  # the split the training script held out
    images = torch.stack([image for image, _ in held_out])
    accuracy = (net.classify(images).argmax(1) == held_out.labels).float().mean().item()
    assert accuracy > 0.97  # measured 0.9749
    assert net(images[:5]).shape == (5, net.num_features) == (5, 64)
    # upsampled inputs are brought back to 8x8 and still classified
    big = torch.nn.functional.interpolate(images, size=32, mode="bilinear")
    assert (net.classify(big).argmax(1) == held_out.labels).float().mean().item() > 0.9
    with pytest.raises(ValueError, match=r"DigitsFeatureNet: images have shape \(2, 3, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8))


def test_feature_weights_refuse_pickled_code(tmp_path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(1), "extra": DigitsFeatureNet}, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=r"load_digits_feature_net\.path: .* not a plain tensor state dict"):
        load_digits_feature_net(str(tmp_path / "crafted.pt"))


def test_fd_real_vs_real_is_zero_and_grows_with_noise(digit_images: torch.Tensor) -> None:
    assert abs(frechet(digit_images, digit_images)) < 1e-4  # measured -9e-10
    with_noise = [frechet(digit_images, noisy(digit_images, std)) for std in (0.1, 0.3, 0.6)]
    assert 1.5 < with_noise[0] < with_noise[1] < with_noise[2]  # measured 2.36, 20.5, 78.5
    assert with_noise[2] > 30 * with_noise[0]
    # two disjoint halves of the same data differ only by sampling: far below heavy noise
    first, second = digit_images[:898], digit_images[898:]
    halves = frechet(first, second)
    assert 1.0 < halves < 6.0  # measured 3.57
    halves_noise = [frechet(first, noisy(second, std)) for std in (0.1, 0.3, 0.6)]
    assert halves < halves_noise[0] < halves_noise[1] < halves_noise[2]  # measured 7.08, 24.2, 84.3


def test_fd_keeps_real_statistics_and_clamps(digit_images: torch.Tensor) -> None:
    fd = FrechetDistance()
    fd.update(digit_images, real=True)
    fd.update(noisy(digit_images, 0.3), real=False)
    first = fd.compute().item()
    fd.reset()  # real features survive (reset_real_features=False), generated ones go
    assert fd.real_features_num_samples.item() == len(digit_images) and fd.fake_features_num_samples.item() == 0
    fd.update(noisy(digit_images, 0.3), real=False)
    assert fd.compute().item() == pytest.approx(first, rel=1e-6)
    fd.reset()
    fd.update(digit_images * 3.0, real=False)  # out-of-range samples are clamped like saved images
    assert fd.compute().item() == pytest.approx(frechet(digit_images, (digit_images * 3.0).clamp(-1, 1)), rel=1e-6)
    with pytest.raises(ValueError, match=r"FrechetDistance\.update: images are torch\.uint8"):
        fd.update(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), real=False)


def test_fd_feature_net_stays_out_of_training_and_checkpoints(digit_images: torch.Tensor) -> None:
    owner = nn.Module()  # stands in for a LightningModule holding the metric
    owner.net = nn.Linear(2, 2)
    owner.fd = FrechetDistance()
    assert [name for name, _ in owner.named_parameters()] == ["net.weight", "net.bias"]
    assert sorted(owner.state_dict()) == ["net.bias", "net.weight"]
    owner.train()
    assert owner.fd.training and not owner.fd.inception.training  # BN/dropout-free anyway, but eval by contract
    owner.half()  # a true-half precision plugin must not turn the feature net half
    assert next(owner.fd.inception.parameters()).dtype == torch.float32
    owner.load_state_dict(owner.state_dict())  # strict load works without the feature weights
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed validation: features still in fp32
        value = frechet(digit_images, noisy(digit_images, 0.3))
    assert value == pytest.approx(frechet(digit_images, noisy(digit_images, 0.3)), rel=1e-5)


def test_fd_pickles_and_checks_custom_nets(digit_images: torch.Tensor) -> None:
    fd = FrechetDistance()
    fd.update(digit_images[:500], real=True)
    copy = pickle.loads(pickle.dumps(fd))  # ddp_spawn pickles the module holding it
    for metric in (fd, copy):
        metric.update(digit_images[500:1000], real=False)
    assert copy.compute().item() == pytest.approx(fd.compute().item(), rel=1e-9)
    with pytest.raises(ValueError, match=r"FrechetDistance\.feature_net: Linear has no int attribute num_features"):
        FrechetDistance(nn.Linear(64, 8))


def test_inception_fid_reports_what_is_missing(tmp_path: Path) -> None:
    assert not inception_fid_available(str(tmp_path / "absent.pth"))
    with pytest.raises(RuntimeError, match=r"inception_fid.*(pip install torch-fidelity|does not exist; download)"):
        inception_fid(str(tmp_path / "absent.pth"))


def test_fd_states_reduce_like_ddp(digit_images: torch.Tensor) -> None:
    # each "rank" sees every other image; merge_state applies the same sum reductions as the DDP sync
    ranks = [FrechetDistance(), FrechetDistance()]
    for rank, metric in enumerate(ranks):
        metric.update(digit_images[rank::2], real=True)
        metric.update(noisy(digit_images, 0.3)[rank::2], real=False)
    ranks[0].merge_state(ranks[1])
    assert ranks[0].real_features_num_samples.item() == len(digit_images)
    assert ranks[0].compute().item() == pytest.approx(frechet(digit_images, noisy(digit_images, 0.3)), rel=1e-6)


def _ddp_worker(rank: int, port: int, images: torch.Tensor, results: "mp.SimpleQueue") -> None:
    """One gloo rank: update with its half of real and noisy images, compute (which syncs), report."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fd = FrechetDistance()
    fd.update(images[rank::2], real=True)
    fd.update(noisy(images, 0.3)[rank::2], real=False)
    results.put((rank, fd.compute().item()))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # ~15 s: two spawned processes each import torch and torchmetrics
def test_fd_syncs_across_ddp_ranks(digit_images: torch.Tensor) -> None:
    import socket

    with socket.socket() as probe:  # a free port, so parallel runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_worker, args=(port, digit_images, results), nprocs=2, join=True)
    values = dict(results.get() for _ in range(2))
    expected = frechet(digit_images, noisy(digit_images, 0.3))
    assert values[0] == pytest.approx(expected, rel=1e-5) and values[1] == pytest.approx(expected, rel=1e-5)
