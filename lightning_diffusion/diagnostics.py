"""Count the operations that make the host wait for the device, on any device (CPU included).

On CUDA a host sync stalls the Python thread until every queued kernel has run: one per training
step is enough to leave the GPU idle while the next step is being launched. PyTorch's own detector
(``torch.cuda.set_sync_debug_mode``) works on CUDA only, so the tests could never check the hot
path. :class:`HostSyncCounter` sees the same events at the dispatcher instead, on every device: an
op whose *result the host must read* (a tensor turned into a Python number or bool) or whose
*output shape depends on tensor values* (``nonzero``, boolean-mask indexing, ``unique``...), and
a copy from an accelerator to the CPU. On a CPU run these cost nothing, but each one is a sync once
the same code runs on a GPU. One blind spot on CPU: ``.tolist()``/``.numpy()`` of a CPU tensor
read its memory without any op, so only their CUDA form (a device-to-host copy) is counted.

Some tensors stay on the host on every device by design, and reading them costs no sync: the step
counters of torch's optimizers (unless ``capturable``/``fused``) are the common case.
:func:`host_side_tensors` finds them; pass them as ``ignore``.

Example::

    with HostSyncCounter() as syncs:
        loss = model.training_step(batch, 0)
        loss.backward()
    assert syncs.count == 0, syncs.summary()
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "is_host_sync", "host_side_tensors"]

# Ops that always make the host wait: the host reads a value, or the output's size depends on values.
_ALWAYS = {
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t), `if t:`
    "is_nonzero", "equal", "allclose",
    "nonzero", "masked_select", "argwhere",
    "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
}


def _packet(func: Any) -> str:
    return func._overloadpacket.__name__ if hasattr(func, "_overloadpacket") else str(func)


def _has_bool_index(args: tuple) -> bool:
    """index / index_put with a boolean mask run ``nonzero`` inside the kernel (a sync on CUDA)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _device_to_host(name: str, args: tuple, kwargs: dict) -> bool:
    """``x.to("cpu")`` / ``cpu_tensor.copy_(x)`` with ``x`` on an accelerator."""
    if name == "_to_copy":
        src, dst = args[0], kwargs.get("device")
        return isinstance(src, torch.Tensor) and dst is not None and torch.device(dst).type == "cpu" \
            and src.device.type not in ("cpu", "meta")
    dst, src = args[0], args[1] if len(args) > 1 else None
    return isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type not in ("cpu", "meta")


def is_host_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the aten op ``func`` called with ``args`` makes the host wait for the device."""
    name = _packet(func)
    if name in _ALWAYS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return _has_bool_index(args)
    if name in ("_to_copy", "copy_") and len(args) > 0:
        return _device_to_host(name, args, kwargs)
    if name == "repeat_interleave":  # without output_size the output length is read from the device
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    return False


class HostSyncCounter(TorchDispatchMode):
    """Count host syncs (see the module docstring) while active; ``count`` and ``by_op`` hold them.

    Thread-local like every dispatch mode; PyTorch carries it into the autograd engine, so the
    backward pass is counted too. Nesting two counters counts each event in the inner one only.
    """

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._ignored = {id(t) for t in ignore}

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if is_host_sync(func, args, kwargs) and not (args and id(args[0]) in self._ignored):
            self.by_op[_packet(func)] += 1
        return func(*args, **kwargs)

    def summary(self) -> str:
        """``"3 host syncs: _local_scalar_dense x2, nonzero x1"`` (or ``"no host syncs"``)."""
        if not self.by_op:
            return "no host syncs"
        ops = ", ".join(f"{name} x{n}" for name, n in self.by_op.most_common())
        return f"{self.count} host sync{'s' if self.count != 1 else ''}: {ops}"


def host_side_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """The optimizers' step counters that live on the CPU whatever the parameters' device.

    torch keeps ``state["step"]`` on the host unless the optimizer is ``capturable`` or ``fused``,
    and reads it with ``.item()`` in its single-tensor path: no sync on a GPU, so not counted.
    """
    return [state["step"] for opt in optimizers for state in opt.state.values()
            if isinstance(state.get("step"), torch.Tensor) and state["step"].device.type == "cpu"]
