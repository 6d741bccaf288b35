"""torch.distributed plumbing for the trainer: process group, DDP / FSDP2 wrapping, and checkpoints.

* ``train.parallel = "none"``: one process; checkpoints are one ``torch.save`` file (``checkpoints/last.pt``).
* ``"ddp"``: ``DistributedDataParallel``; every rank holds the whole model, rank 0 writes ``last.pt``.
* ``"fsdp"``: FSDP2 ``fully_shard`` on every transformer block and at the root; the optimizer is built on
  the sharded (DTensor) parameters; checkpoints are ``torch.distributed.checkpoint`` folders
  (``checkpoints/last.dcp/``: each rank writes its shards) plus ``extra.pt`` (step, scheduler, controller).

Launch with ``torchrun --nproc_per_node N -m layerwise train ...`` (multi-node: torchrun's ``--nnodes`` and
``--rdzv-endpoint``).  Without torchrun a ``ddp``/``fsdp`` run forms a group of one.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.parallel != "none"

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self, barrier: bool = True) -> None:
        """Leave the group; ``barrier=False`` after an error (a peer may be gone: waiting would only time out)."""
        if self.owns_group and dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(parallel: str, device: str, timeout_s: float | None = None) -> DistContext:
    """Join (or, without torchrun, create a one-process) process group for ``ddp``/``fsdp``; ``timeout_s``
    bounds every collective (``train.dist_timeout_s``: a stalled peer ends the job instead of hanging it)."""
    if parallel == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                "launched with torchrun (WORLD_SIZE > 1) but train.parallel='none'; "
                "set --set train.parallel=ddp or fsdp"
            )
        return DistContext()
    owns = False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
            )
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if timeout_s:
            import datetime

            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend)
        owns = True
        from layerwise.lab.distwatch import watch_parent

        watch_parent()  # a torchrun worker exits if its agent is killed, instead of training on as an orphan
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), parallel, owns)


def wrap(model: nn.Module, ctx: DistContext, device: str) -> nn.Module:
    """DDP-wrap, or FSDP2-shard in place (blocks, then root); returns the module to call for forward."""
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.local_rank] if device == "cuda" else None)
    if ctx.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from layerwise.lab.hf_models import decoder_layers

        for block in decoder_layers(model):
            fully_shard(block)
        fully_shard(model)
    return model


def set_grad_sync(fwd_model: nn.Module, ctx: DistContext, enabled: bool):
    """Context for one micro-batch: skip the gradient all-reduce on all but the last micro-batch."""
    import contextlib

    target = getattr(fwd_model, "_orig_mod", fwd_model)  # under torch.compile: the DDP / FSDP module it wraps
    if ctx.parallel == "ddp" and not enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not isinstance(target, DDP):
            raise TypeError(f"set_grad_sync: parallel='ddp' but the model is a {type(target).__name__}")
        return target.no_sync()
    if ctx.parallel == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(target, FSDPModule):
            raise TypeError(f"set_grad_sync: parallel='fsdp' but the model is a {type(target).__name__}")
        target.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ checkpoints
def model_state(model: nn.Module, ctx: DistContext, *, full: bool = True) -> dict[str, Any]:
    """The plain (unsharded, CPU) state dict of the model; a collective under FSDP (call on every rank)."""
    if ctx.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=full, cpu_offload=True))
    return model.state_dict()


def save_sharded(path: Path, model: nn.Module, optimizer, extra: dict, ctx: DistContext, save_fn, commit=None) -> None:
    """DCP save into a temporary folder, then swap it in for ``path`` (rank 0), so an interrupted save never
    replaces a good checkpoint.  ``commit(tmp)`` (rank 0) does the swap instead when given (rotation)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f"{path.name}.old")
    if ctx.is_main and tmp.exists():
        shutil.rmtree(tmp)
    ctx.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    if ctx.is_main:
        save_fn(extra, tmp / "extra.pt")
        if commit is not None:
            commit(tmp)
        elif path.exists():
            os.replace(path, old)
        if commit is None:
            os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    ctx.barrier()


def sharded_checkpoint(path: Path) -> Path | None:
    """The complete DCP folder at ``path`` (or the ``.old`` one a crash mid-swap left behind)."""
    for p in (path, path.with_name(f"{path.name}.old")):
        if (p / "extra.pt").exists() and (p / ".metadata").exists():
            return p
    return None


def load_sharded(path: Path, model: nn.Module, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from layerwise.lab.safeload import load_dcp

    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optimizer": osd}
    load_dcp(state, path)  # .metadata and non-tensor entries read without unpickling arbitrary globals
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_sharded_model_state(path: str | Path) -> dict[str, Any]:
    """Read the model weights of a DCP checkpoint folder in one process (no process group needed), e.g. for
    ``layerwise analyze`` and export.  Read through :mod:`layerwise.lab.safeload` (no code runs from it)."""
    from layerwise.lab.safeload import load_dcp_full

    full = load_dcp_full(path)
    if not isinstance(full.get("model"), dict):
        from layerwise.lab.safeload import UnsafeCheckpointError

        raise UnsafeCheckpointError(f"{path}: DCP checkpoint has no 'model' entry (keys: {sorted(full)[:5]})")
    return full["model"]
