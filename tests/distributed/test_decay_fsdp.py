"""The gradient-driven decay controllers (AWD, AdaDecay) on a FSDP2-sharded model equal one process, and
``global_norms`` (their whole-tensor norms of DTensor shards) equals the norms of the full tensors.

Before, AdaDecay's pre-step hook raised on DTensor gradients ("mixed torch.Tensor and DTensor")."""

from __future__ import annotations

import copy

import pytest
import torch
from _fsdp import forked_ranks, shard, train

import layerwise as lw
from layerwise._sharding import global_norms
from layerwise.decay.baselines import AWD, AdaDecay
from layerwise.lab.model import build_model

pytestmark = pytest.mark.timeout(300)


def test_global_norms_plain_tensors_match_float64():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).half(), torch.zeros(2, 2)]
    want = [float(torch.linalg.vector_norm(t.double())) for t in ts]
    assert global_norms(ts, "cpu").tolist() == pytest.approx(want, rel=1e-3)
    assert global_norms([], "cpu").shape == (0,)


def _controller(model, cls, kw):
    opt = torch.optim.AdamW(lw.param_groups(model, 1e-2, 0.1, per_matrix=True), lr=1e-2)
    return opt, cls(opt, model, **kw)


def _worker(rank: int) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))

    # global_norms: uneven row shards (7 = 4 + 3), a column shard, a replicated tensor and a plain one mixed
    g = torch.Generator().manual_seed(1)
    full = [torch.randn(7, 5, generator=g), torch.randn(4, 6, generator=g), torch.randn(3, generator=g)]
    plain = torch.randn(4, generator=g)
    mixed = [
        distribute_tensor(full[0], mesh, [Shard(0)]),
        plain,
        distribute_tensor(full[1], mesh, [Shard(1)]),
        distribute_tensor(full[2], mesh, [Replicate()]),
    ]
    want = [float(torch.linalg.vector_norm(t.double())) for t in (full[0], plain, full[1], full[2])]
    assert global_norms(mixed, "cpu").tolist() == pytest.approx(want, rel=1e-6)

    # AWD (every step) and AdaDecay (interval 1, so every step recomputes) on a sharded nano model
    for cls, kw in [(AWD, {}), (AdaDecay, {"interval": 1}), (AdaDecay, {"interval": 1, "norm": "rms"})]:
        torch.manual_seed(0)
        ref = build_model("nano", vocab_size=64)
        sh = shard(copy.deepcopy(ref))
        o_ref, c_ref = _controller(ref, cls, kw)
        o_sh, c_sh = _controller(sh, cls, kw)
        for s in range(3):
            train(ref, o_ref, [s])
            train(sh, o_sh, [s])
            wd_ref = [gr["weight_decay"] for gr in o_ref.param_groups]
            wd_sh = [gr["weight_decay"] for gr in o_sh.param_groups]
            assert wd_sh == pytest.approx(wd_ref, rel=1e-5), (cls.__name__, kw, s)
        assert set(wd_ref) - {0.0, 0.1}, "the controller should have moved the decays off the base 0.1"
        assert [r["weight_decay"] for r in c_sh.table()] == pytest.approx([r["weight_decay"] for r in c_ref.table()])
        for (n, p), (_, q) in zip(ref.named_parameters(), sh.named_parameters()):
            torch.testing.assert_close(q.full_tensor(), p, rtol=1e-5, atol=1e-6, msg=f"{cls.__name__} {n}")
    dist.destroy_process_group()


def test_awd_and_adadecay_under_fsdp2_equal_one_process():
    assert forked_ranks(_worker) == [0, 0]
