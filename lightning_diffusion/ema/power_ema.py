"""PowerFunctionEMA: several power-function EMA profiles of one module (docs/algorithms.md 3.4).

Parameters are averaged with fused ``torch._foreach_lerp_``; buffers are copied. Averages of
fp16/bf16 parameters are kept in float32. The averages live on the parameters' device (moved
there lazily at the first update) or on the CPU with ``offload_to_cpu=True``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..core.shards import full_tensor, local, local_rows_of, reshard, shard_spec, to_global
from .profiles import check_sigma_rel, power_function_beta, sigma_rel_to_gamma

__all__ = ["PowerFunctionEMA"]


def _average_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class PowerFunctionEMA:
    """Track ``sigma_rels`` profiles of ``module``; time is counted in images seen.

    Example::

        ema = PowerFunctionEMA(net, sigma_rels=(0.05, 0.10))
        for step in range(1, n + 1):
            train_one_step(net)
            ema.update(nimg=step * batch, dt_nimg=batch)
        with ema.swapped_in(1):  # net now holds the sigma_rel=0.10 average
            evaluate(net)
    """

    def __init__(self, module: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10),
                 offload_to_cpu: bool = False) -> None:
        if not len(sigma_rels):
            raise ValueError("sigma_rels=() must name at least one profile, e.g. (0.05, 0.10).")
        self.sigma_rels = [check_sigma_rel(s, "sigma_rels") for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.module, self.offload_to_cpu = module, offload_to_cpu
        reshard(module)
        entries = module.state_dict(keep_vars=True)
        self.param_names = [k for k, v in entries.items() if isinstance(v, nn.Parameter) and v.is_floating_point()]
        self.buffer_names = [k for k in entries if k not in set(self.param_names)]
        # FSDP2: each rank averages its own rows of each parameter (docs/sharding.md); specs say where they go.
        self.specs = [shard_spec(entries[k]) for k in self.param_names]
        device = torch.device("cpu") if offload_to_cpu else None
        with torch.no_grad():
            self.averages = [[local(entries[k]).detach().to(device, _average_dtype(entries[k].dtype), copy=True)
                              for k in self.param_names] for _ in self.sigma_rels]
            self.buffers = [entries[k].detach().to(device, copy=True) for k in self.buffer_names]
        self.nimg, self.num_updates = 0, 0
        self._backup: list[Tensor] | None = None

    # ------------------------------------------------------------------ update
    def _live(self) -> tuple[list[Tensor], list[Tensor]]:
        reshard(self.module)  # sharded parameters, never the gathered copies a no-grad forward leaves
        entries = self.module.state_dict(keep_vars=True)
        return [local(entries[k]) for k in self.param_names], [entries[k] for k in self.buffer_names]

    @property
    def sharded(self) -> bool:
        """Whether the averages are this rank's FSDP2 rows rather than whole tensors."""
        return any(spec is not None for spec in self.specs)

    def to(self, device: torch.device | str) -> "PowerFunctionEMA":
        """Move the averages (e.g. after Lightning moved the module)."""
        self.averages = [[a.to(device) for a in avg] for avg in self.averages]
        self.buffers = [b.to(device) for b in self.buffers]
        return self

    @property
    def device(self) -> torch.device:
        tensors = self.averages[0] + self.buffers
        return tensors[0].device if tensors else torch.device("cpu")

    @torch.no_grad()
    def update(self, nimg: int, dt_nimg: int) -> None:
        """One EMA step after an optimizer step: ``beta = (1 - dt/t)^(gamma+1)`` per profile."""
        if nimg != self.nimg + dt_nimg:
            raise ValueError(f"PowerFunctionEMA.update(nimg={nimg}, dt_nimg={dt_nimg}) does not continue from "
                             f"nimg={self.nimg}: dt_nimg must be the images seen since the last update.")
        params, buffers = self._live()
        target = torch.device("cpu") if self.offload_to_cpu else (params + buffers or [torch.empty(0)])[0].device
        if self.device != target:
            self.to(target)
        if params:
            sources = [p.detach().to(target, a.dtype) for p, a in zip(params, self.averages[0])]
            for sigma_rel, average in zip(self.sigma_rels, self.averages):
                beta = 0.0 if self.num_updates == 0 else power_function_beta(sigma_rel, nimg, dt_nimg)
                torch._foreach_lerp_(average, sources, 1.0 - beta)
        if buffers:
            torch._foreach_copy_(self.buffers, [b.detach().to(target) for b in buffers])
        self.nimg, self.num_updates = nimg, self.num_updates + 1

    # ------------------------------------------------------------------ reading the averages
    def profile_state_dict(self, index: int, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Profile ``index``'s averaged weights (and the copied buffers), keyed like ``module.state_dict()``."""
        out = {k: (a if dtype is None else a.to(dtype)).clone() for k, a in zip(self.param_names, self.averages[index])}
        out.update({k: b.clone() for k, b in zip(self.buffer_names, self.buffers)})
        return out

    @torch.no_grad()
    def gathered_profile_state_dict(self, index: int, keep: bool = True) -> dict[str, Tensor]:
        """Profile ``index`` as whole CPU tensors (sharded: a collective, gathered one tensor at a time).

        Every rank must call it; ranks with ``keep=False`` drop each whole tensor as soon as it arrived
        (and return ``{}``), so only the writer holds the whole profile.
        """
        out = {}
        for k, a, spec in zip(self.param_names, self.averages[index], self.specs):
            whole = full_tensor(a, spec)
            if keep:
                out[k] = whole.detach().to("cpu", copy=True)
        if keep:
            out.update({k: b.detach().to("cpu", copy=True) for k, b in zip(self.buffer_names, self.buffers)})
        return out

    def global_averages(self) -> dict[str, Tensor]:
        """``{"<profile>.<name>": DTensor}`` views of the sharded averages, for a distributed checkpoint."""
        return {f"{i}.{k}": to_global(a, spec) for i, averages in enumerate(self.averages)
                for k, a, spec in zip(self.param_names, averages, self.specs) if spec is not None}

    @torch.no_grad()
    def swap_in(self, index: int) -> None:
        """Copy profile ``index`` into the module (in place); :meth:`swap_out` restores the raw weights."""
        if self._backup is not None:
            raise RuntimeError("PowerFunctionEMA.swap_in called twice without swap_out.")
        if self.num_updates == 0:
            raise RuntimeError(f"the sigma_rel={self.sigma_rels[index]} average has had no update yet: "
                               "nothing to swap in.")
        params, buffers = self._live()
        live = params + buffers
        self._backup = [t.detach().clone() for t in live]
        torch._foreach_copy_([t.data for t in live], self.averages[index] + self.buffers)

    @torch.no_grad()
    def swap_out(self) -> None:
        """Restore the raw weights saved by :meth:`swap_in` (no-op if nothing is swapped in)."""
        if self._backup is None:
            return
        params, buffers = self._live()
        torch._foreach_copy_([t.data for t in params + buffers], self._backup)
        self._backup = None

    @property
    def swapped(self) -> bool:
        return self._backup is not None

    @contextlib.contextmanager
    def swapped_in(self, index: int) -> Iterator[nn.Module]:
        """Context manager: the module holds profile ``index`` inside, its raw weights after."""
        self.swap_in(index)
        try:
            yield self.module
        finally:
            self.swap_out()

    # ------------------------------------------------------------------ state
    def state_dict(self, averages: str = "local") -> dict[str, Any]:
        """Plain tensors and numbers only: loads with ``torch.load(weights_only=True)``.

        ``averages``: ``"local"`` (this rank's tensors, whole ones when unsharded), ``"gathered"`` (whole
        tensors; a collective when sharded), ``"none"`` (kept elsewhere: a distributed checkpoint) or
        ``"gathered_elsewhere"`` (take part in the gathering, keep nothing: a rank that does not write).
        """
        if averages in ("gathered", "gathered_elsewhere"):
            keep = averages == "gathered"
            profiles = [self.gathered_profile_state_dict(i, keep) for i in range(len(self.averages))]
            saved = [[profile[k] for k in self.param_names] for profile in profiles] if keep else []
        else:
            saved = None if averages == "none" else [[a.detach().clone() for a in avg] for avg in self.averages]
        return {"sigma_rels": list(self.sigma_rels), "nimg": int(self.nimg), "num_updates": int(self.num_updates),
                "param_names": list(self.param_names), "buffer_names": list(self.buffer_names),
                "averages": saved, "buffers": [b.detach().clone() for b in self.buffers]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"EMA state tracks sigma_rels={state['sigma_rels']}, "
                             f"this EMA sigma_rels={self.sigma_rels}.")
        if list(state["param_names"]) != self.param_names or list(state["buffer_names"]) != self.buffer_names:
            raise ValueError("EMA state was saved for a module with different parameter or buffer names.")
        for average, saved in zip(self.averages, state["averages"] or ()):  # None: loaded by the caller (DCP)
            # whole tensors (a DDP run's, or gathered) into a sharded EMA: this rank's rows of each
            rows = [s if tuple(s.shape) == tuple(a.shape) else local_rows_of(s, spec)
                    for s, a, spec in zip(saved, average, self.specs)]
            torch._foreach_copy_(average, [r.to(a.device) for r, a in zip(rows, average)])
        if self.buffers:
            torch._foreach_copy_(self.buffers, [s.to(b.device) for s, b in zip(state["buffers"], self.buffers)])
        self.nimg, self.num_updates = int(state["nimg"]), int(state["num_updates"])
