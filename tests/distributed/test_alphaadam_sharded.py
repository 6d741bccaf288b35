"""AlphaAdam / CautiousAdamW on sharded (DTensor, FSDP2) parameters with 2 gloo ranks: the sharded step (local
partial sums, one all-reduce) against the one-process eager reference, with ``alpha_lag`` 0 and 1, and a DCP
save / load of the ``alpha_lag=1`` state that continues exactly like the uninterrupted run.

Run as a script under torchrun, this file is the worker of :func:`test_sharded_alphaadam_equals_one_process`.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from _fsdp import dcp_round_trip, shard, torchrun, train

pytestmark = pytest.mark.timeout(300)


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from layerwise.lab.model import build_model
    from layerwise.optim.alphaadam import AlphaAdam, CautiousAdamW

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))

    # (a) DTensor parameters (uneven row shards 4 + 3, a column-sharded matrix, a vector) == one process
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(7, 5, generator=g), torch.randn(5, 7, generator=g), torch.randn(6, generator=g)]
    grads = [[torch.randn(w.shape, generator=g) for w in full] for _ in range(5)]
    placements = [Shard(0), Shard(1), Shard(0)]
    for cls, kw in [
        (AlphaAdam, dict(alpha_lag=0)),
        (AlphaAdam, dict(alpha_lag=1)),
        (AlphaAdam, dict(alpha_lag=1, mask_ref="current", alpha_mode="density", floor=0.2)),
        (CautiousAdamW, dict(alpha_lag=1)),
    ]:
        plain = [nn.Parameter(w.clone()) for w in full]
        dt = [nn.Parameter(distribute_tensor(w.clone(), mesh, [pl])) for w, pl in zip(full, placements)]
        ref = cls(plain, lr=0.05, weight_decay=0.1, fast=False, **kw)
        sh = cls(dt, lr=0.05, weight_decay=0.1, **kw)
        for gs in grads:
            for p, q, gr, pl in zip(plain, dt, gs, placements):
                p.grad = gr.clone()
                q.grad = distribute_tensor(gr.clone(), mesh, [pl])
            ref.step()
            sh.step()
            dr, ds = ref.diagnostics(), sh.diagnostics()
            for name in dr:
                assert abs(ds[name]["alpha"] - dr[name]["alpha"]) <= 1e-5 * dr[name]["alpha"], (cls, kw, name)
                assert abs(ds[name]["mask_density"] - dr[name]["mask_density"]) <= 1e-6, (cls, kw, name)
        assert max(d["alpha"] for d in dr.values()) > 1.05, (cls, kw)  # the masks were not trivial
        for i, (p, q) in enumerate(zip(plain, dt)):
            torch.testing.assert_close(q.detach().full_tensor(), p.detach(), rtol=1e-5, atol=1e-6, msg=f"{kw} {i}")
            if kw["alpha_lag"]:
                s_ref, s_sh = ref.state[p]["alpha_sums"], sh.state[q]["alpha_sums"]
                torch.testing.assert_close(s_sh, s_ref, rtol=1e-5, atol=0)  # the all-reduced sums, on every rank
            else:
                assert "alpha_sums" not in sh.state[q]

    # (b) FSDP2 nano model, alpha_lag=1: DCP round trip after 2 steps, then one more step == uninterrupted
    torch.manual_seed(0)
    base = build_model("nano", vocab_size=64)
    init = copy.deepcopy(base.state_dict())
    sh = shard(copy.deepcopy(base))
    o_sh = AlphaAdam(sh.parameters(), lr=1e-2, weight_decay=0.1, alpha_lag=1)
    train(sh, o_sh, range(2))
    fresh = build_model("nano", vocab_size=64)
    fresh.load_state_dict(init)
    fresh = shard(fresh)
    o_fresh = AlphaAdam(fresh.parameters(), lr=1e-2, weight_decay=0.1, alpha_lag=1)
    dcp_round_trip(sh, o_sh, fresh, o_fresh, out / "ckpt")
    for p, q in zip(sh.parameters(), fresh.parameters()):
        a, b = o_sh.state[p]["alpha_sums"], o_fresh.state[q]["alpha_sums"]
        assert b.dtype == torch.float32 and torch.equal(a, b)
    train(sh, o_sh, [2, 3])
    train(fresh, o_fresh, [2, 3])
    for (n, p), (_, q) in zip(sh.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), f"after DCP resume: {n}"
    (out / f"ok{dist.get_rank()}").write_text("ok")
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_alphaadam_equals_one_process(tmp_path):
    torchrun(str(Path(__file__).resolve()), str(tmp_path))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    # every check has passed and the process group is destroyed: skip the interpreter's teardown (see
    # test_muon_fsdp.py: a rare SIGABRT from a joinable C++ thread at exit on this machine)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
