"""Every network of the package under FSDP2 (docs/sharding.md) on two CPU processes over gloo: sharded per
block, it computes the unsharded network's output and gradients, and forced weight normalization on each
rank's rows equals normalization of the whole weight. Runs with ``torch.multiprocessing`` (no Lightning)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_diffusion.core.shards import local, reshard, shard_spec
from lightning_diffusion.networks import DiT, EDM2UNet, UNet
from lightning_diffusion.networks.mp import normalize_mp_weights_
from lightning_diffusion.sharding import fsdp_blocks, shard_module

NETS = {
    "UNet": lambda: UNet(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(4,), num_classes=10),
    "EDM2UNet": lambda: EDM2UNet(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                 attention_resolutions=(4,), channels_per_head=16, num_classes=10),
    "DiT": lambda: DiT(in_channels=1, image_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {name: _compare(name) for name in NETS}  # one process group for all: start-up is the cost
        results["ema"] = _ema_layouts(os.path.dirname(out))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _compare(name: str) -> dict[str, float]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    whole, net = NETS[name](), NETS[name]()
    net.load_state_dict(whole.state_dict())
    with torch.no_grad():  # gains start at 0 (EDM2) or zero-init layers: make every path carry signal
        for a, b in zip(whole.parameters(), net.parameters()):
            noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel())) * 0.3
            a.add_(noise)
            b.add_(noise)
    shard_module(net, init_device_mesh("cpu", (2,)), roots=(net,))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    level, labels = torch.tensor([0.1, 0.5, 1.0, 2.0]), torch.tensor([0, 3, 9, 10])
    for model in (whole, net):
        model(x, level, labels).square().mean().backward()
    result = {"blocks": len(fsdp_blocks(whole)), "sharded": sum(shard_spec(p) is not None for p in net.parameters()),
              "params": sum(1 for _ in whole.parameters()),
              "grad": max(_gap(p.grad, g) for p, g in zip(net.parameters(), _rows(whole, net)))}
    with torch.no_grad():
        result["out"] = (net(x, level, labels) - whole(x, level, labels)).abs().max().item()
    reshard(net)  # the roots stay gathered after a no-grad forward
    normalize_mp_weights_(whole)
    normalize_mp_weights_(net)
    result["renorm"] = max(_gap(p, w) for p, w in zip(net.parameters(), _rows(whole, net, grads=False)))
    return result


def _ema_layouts(folder: str) -> dict[str, bool]:
    """Whole EMA averages (a DDP checkpoint's) load into a sharded EMA as its rows; sharded averages saved in a
    distributed checkpoint load into another layout (HSDP: each rank holds every row): both exact."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_diffusion.callbacks.ema_shards import load_sharded_averages, sharded_checkpoint_entries
    from lightning_diffusion.ema import PowerFunctionEMA

    torch.manual_seed(0)
    whole = NETS["EDM2UNet"]()
    reference = PowerFunctionEMA(whole, (0.05, 0.10))
    for nimg, seed in ((100, 1), (150, 2)):  # two updates of moved weights: the two profiles differ
        with torch.no_grad():
            for p in whole.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * p.numel())))
        reference.update(nimg, nimg - reference.nimg)
    nets = {name: NETS["EDM2UNet"]() for name in ("fsdp", "hsdp")}
    shard_module(nets["fsdp"], init_device_mesh("cpu", (2,)), roots=(nets["fsdp"],))
    shard_module(nets["hsdp"], init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")),
                 roots=(nets["hsdp"],))
    sharded, other = PowerFunctionEMA(nets["fsdp"], (0.05, 0.10)), PowerFunctionEMA(nets["hsdp"], (0.05, 0.10))
    sharded.load_state_dict(reference.state_dict())  # whole -> this rank's rows
    checkpoint = os.path.join(folder, "ema.ckpt")
    dcp.save({"state_dict": sharded_checkpoint_entries(sharded)}, checkpoint_id=checkpoint)
    other.load_state_dict(sharded.state_dict("none"))  # counters; the averages come from the folder:
    load_sharded_averages(other, checkpoint)
    same = {}
    for i in range(2):
        want = reference.profile_state_dict(i)
        same[f"rows{i}"] = all(torch.equal(v, want[k]) for k, v in sharded.gathered_profile_state_dict(i).items())
        same[f"relayout{i}"] = all(torch.equal(a, want[k]) for k, a in zip(other.param_names, other.averages[i]))
    same["distinct"] = not torch.equal(reference.averages[0][0], reference.averages[1][0])
    return same


def _rows(whole: nn.Module, net: nn.Module, grads: bool = True) -> list[torch.Tensor | None]:
    """This rank's rows of each whole parameter (or its gradient), matched to the sharded parameters."""
    rows = []
    for p, q in zip(whole.parameters(), net.parameters()):
        spec, value = shard_spec(q), (p.grad if grads else p.detach())
        if value is not None and spec is not None:
            value = value[spec.offset:spec.offset + local(q).shape[0]]
        rows.append(value)
    return rows


def _gap(sharded: torch.Tensor | None, rows: torch.Tensor | None) -> float:
    """Largest difference of a rank's rows (0 for no rows, or for a parameter no loss reached in both)."""
    if sharded is None or rows is None:
        assert sharded is None and rows is None, "a gradient in one network only"
        return 0.0
    mine = local(sharded).detach()
    return (mine - rows).abs().max().item() if mine.numel() else 0.0


@pytest.mark.timeout(180)
def test_every_network_shards_per_block_and_computes_the_same(tmp_path):
    out = tmp_path / "result.pt"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=2)
    results = torch.load(out, weights_only=True)
    assert all(results.pop("ema").values())  # EMA restores across layouts, exactly (see _ema_layouts)
    assert sorted(results) == sorted(NETS)
    for name, result in results.items():
        assert result["blocks"] >= 2 and result["sharded"] == result["params"], name  # every parameter a shard
        assert result["out"] < 1e-5 and result["grad"] < 1e-5, (name, result)
        assert result["renorm"] < 1e-6, (name, result)  # MP weights normalized on each rank's rows == whole
