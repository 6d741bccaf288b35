"""Helpers of the 2-rank FSDP tests: launching a worker under torchrun, sharding the nano model, and a few
training steps on batches that are the same on every rank."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torch.distributed.run --standalone --nproc_per_node=2 ARGS`` with one thread per rank; asserts success."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    # the environment is read now, not at import: conftest's session fixture has by then pointed
    # LAYERWISE_CACHE at a temporary folder (an import-time copy wrote into the user's ~/.cache/layerwise)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def shard(model):
    """FSDP2 over every block, then the whole model."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on every rank: FSDP's averaged gradient equals the one-process one."""
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 64, (4, 16), generator=g)
    return idx, torch.roll(idx, -1, 1)


def train(model, opt, steps) -> None:
    for s in steps:
        opt.zero_grad()
        model(*batch(s))[1].backward()
        opt.step()


def dcp_round_trip(model, opt, fresh_model, fresh_opt, ckpt) -> None:
    """Save ``model`` and ``opt`` with torch.distributed.checkpoint to ``ckpt``, then load them into
    ``fresh_model`` and ``fresh_opt`` (the way the trainer resumes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(ckpt))
    msd2, osd2 = get_state_dict(fresh_model, fresh_opt)
    state = {"model": msd2, "optimizer": osd2}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(fresh_model, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _forked_rank(fn, rank: int, world: int, port: int, args: tuple) -> None:
    code = 1
    try:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        fn(rank, *args)
        code = 0
    except BaseException:  # noqa: BLE001 - report and exit non-zero
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown in a forked child


def forked_ranks(fn, *args, world: int = 2, timeout: float = 240) -> list[int | None]:
    """Run ``fn(rank, *args)`` in ``world`` processes forked from this one (torch, transformers and the test's
    code already imported: about 20 s less CPU than a torchrun launch on 2 cores), each with the torchrun
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT`` of a free port), so ``fn`` joins a real
    process group as under torchrun.  Returns the exit codes (0 = ``fn`` returned; a traceback is printed
    otherwise); a rank still alive after ``timeout`` seconds is killed (code ``None``)."""
    import multiprocessing as mp

    from layerwise.lab.distributed import _free_port

    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_forked_rank, args=(fn, r, world, port, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes
