"""FSDP2 through Lightning's ``ModelParallelStrategy`` (docs/sharding.md).

:class:`FSDP2Strategy` is a ``ModelParallelStrategy`` whose device mesh is ``("replicate",
"shard")``: ``shard_size`` ranks share one copy of the model (default: all of them, full
sharding); groups of ``shard_size`` ranks replicate it (HSDP: shard within a node, replicate across
nodes). Every rank reads its own data. :func:`shard_module` applies ``fully_shard`` per block and
then per root; ``DiffusionLightningModule.configure_model`` calls it, and a user's own module can too.

Plain ``ModelParallelStrategy(data_parallel_size=<all ranks>, tensor_parallel_size=1)`` works as
well (full sharding over its ``data_parallel`` mesh dimension).
"""

from __future__ import annotations

from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from .core.shards import reshard

__all__ = ["FSDP2Strategy", "shard_module", "fsdp_blocks", "data_parallel_mesh", "check_strategy", "is_sharded",
           "reshard", "param_dtype_for"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2 data parallelism: mesh ``("replicate", "shard")``.

    Args:
        shard_size: ranks that share (shard) one copy of the model; ``None`` (default): all ranks.
            Set it to the GPUs per node on several nodes (HSDP): parameters all-gather over the
            fast links inside a node, gradients all-reduce across nodes. Must divide the world size.
        save_distributed_checkpoint: each rank writes its shard of the weights and optimizer state
            (a checkpoint is a folder; the default); ``False`` gathers one file on rank 0.
        process_group_backend, timeout: as in ``ModelParallelStrategy``.

    Example (YAML, ``configs/trainer/fsdp.yaml``)::

        trainer:
          strategy:
            class_path: lightning_diffusion.sharding.FSDP2Strategy
            init_args: {shard_size: null}
    """

    def __init__(self, shard_size: int | None = None, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout: Any = None) -> None:
        if shard_size is not None and shard_size < 1:
            raise ValueError(f"FSDP2Strategy.shard_size={shard_size} must be >= 1 or null (all ranks).")
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.shard_size = shard_size

    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed()  # ModelParallelStrategy's: the process group and seed, no mesh yet
        world = self.world_size
        shard = world if self.shard_size is None else self.shard_size
        if world % shard:
            raise ValueError(f"FSDP2Strategy.shard_size={self.shard_size} must divide the number of processes "
                             f"({world} = num_nodes x devices).")
        self._data_parallel_size, self._tensor_parallel_size = world, 1
        self._device_mesh = init_device_mesh(self.root_device.type, (world // shard, shard),
                                             mesh_dim_names=("replicate", "shard"))
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}  # every rank reads its own data


def data_parallel_mesh(mesh: Any) -> Any:
    """The mesh ``fully_shard`` takes: FSDP2Strategy's whole 2-D mesh (HSDP when it replicates) or its
    ``shard`` dimension alone; ModelParallelStrategy's ``data_parallel`` dimension (tensor parallel size 1)."""
    names = tuple(mesh.mesh_dim_names or ())
    if names == ("replicate", "shard"):
        return mesh if mesh["replicate"].size() > 1 else mesh["shard"]
    if "data_parallel" in names:
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"ModelParallelStrategy(tensor_parallel_size={mesh['tensor_parallel'].size()}): the "
                             f"networks of lightning_diffusion have no tensor parallelism; use tensor_parallel_size=1 "
                             f"and data_parallel_size=<all ranks>, or lightning_diffusion.sharding.FSDP2Strategy.")
        return mesh["data_parallel"]
    return mesh


def fsdp_blocks(net: nn.Module) -> list[nn.Module]:
    """The units FSDP2 all-gathers one at a time: the network's ``fsdp_blocks()`` if it defines one, else
    every entry (with parameters) of each ``nn.ModuleList`` directly under it (UNet, EDM2UNet and DiT stages)."""
    if hasattr(net, "fsdp_blocks"):
        return list(net.fsdp_blocks())
    lists: Iterable[nn.Module] = (m for m in net.children() if isinstance(m, nn.ModuleList))
    return [block for blocks in lists for block in blocks if any(True for _ in block.parameters())]


def shard_module(module: nn.Module, mesh: Any, roots: Iterable[nn.Module | None], param_dtype: torch.dtype | None = None
                 ) -> None:
    """``fully_shard`` each block of every root, then the root (docs/sharding.md); idempotent.

    ``param_dtype`` (e.g. ``torch.bfloat16`` on GPUs) is FSDP2's mixed-precision policy: parameters
    all-gather and compute in it, gradients reduce in float32, the sharded weights stay float32.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = data_parallel_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
    for root in roots:
        if root is None or isinstance(root, FSDPModule) or not any(True for _ in root.parameters()):
            continue
        for block in fsdp_blocks(root):
            fully_shard(block, **kwargs)
        fully_shard(root, **kwargs)


def is_sharded(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` is FSDP2-sharded."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def check_strategy(strategy: Strategy, who: str) -> None:
    """Refuse, in one sentence, strategies whose parameters this library cannot average or normalize."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ValueError(f"{who}: trainer.strategy={type(strategy).__name__} flattens the parameters, which "
                         f"{who} cannot shard-average; use FSDP2 instead: --config configs/trainer/fsdp.yaml "
                         f"(lightning_diffusion.sharding.FSDP2Strategy), or ddp.")


def param_dtype_for(trainer: pl.Trainer) -> torch.dtype | None:
    """FSDP2's compute dtype for ``trainer``'s precision: bf16 for ``bf16-mixed`` on GPUs, else none."""
    on_gpu = trainer.strategy.root_device.type == "cuda"
    return torch.bfloat16 if on_gpu and str(trainer.precision).startswith("bf16") else None

