"""Per-tensor width scaling survives FSDP2: on a tiny HF Llama sharded with ``fully_shard`` over 2 gloo ranks,
``WidthScaling.from_models`` (against a base on the meta device) gives the same per-tensor classes, and
``param_groups`` the same (lr, weight decay) per canonical name, as on the unsharded model; ``apply_`` after
sharding gives the same logits as ``apply_`` before it, and a training step on the sharded μP model equals the
one-process step.

The ranks are forked from the test process (transformers already imported) and join a real gloo group."""

from __future__ import annotations

import json

import pytest
import torch
from _fsdp import forked_ranks
from tests._zoo import hf_llama

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

LR, WD = 1e-2, 0.1


def _llama(hidden: int, inter: int, *, meta: bool = False):
    return hf_llama(hidden, inter, heads=2, meta=meta)


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _setup(shard: bool) -> dict:
    """Build, (shard,) scale, apply_, one AdamW step; what both sides compare."""
    import layerwise as lw

    model = _llama(32, 64)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    rule = lw.WidthScaling.from_models(model, base=_llama(16, 32, meta=True))
    rule.apply_(model)
    groups = lw.param_groups(model, LR, WD, scaling=rule)
    factors = {n: [g["lr"], g["weight_decay"], g["param_class"]] for g in groups for n in g["param_names"]}
    opt = torch.optim.AdamW(groups, foreach=False)
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    return {
        "factors": factors,
        "classes": {t.name: [t.param_class, t.m_in, t.m_out] for t in rule.tensors or ()},
        "logits0": out.logits.detach().double().tolist(),
        "logits1": after.double().tolist(),
    }


def _sharded_rank(rank: int, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    res = _setup(shard=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def test_from_models_param_groups_apply_under_fsdp2(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group from an earlier test is up in this process; forked ranks would inherit it")
    torch.set_num_threads(1)
    ref = _setup(shard=False)
    out = tmp_path / "rank0.json"
    codes = forked_ranks(_sharded_rank, str(out))
    assert codes == [0, 0], f"rank exit codes {codes}"
    got = json.loads(out.read_text())
    # same canonical names, classes and (lr, λ) per tensor: nothing keyed by the FSDP-wrapped objects
    assert got["factors"] == ref["factors"]
    assert got["classes"] == ref["classes"] and len(ref["classes"]) == len(ref["factors"])
    matrix = [n for n, (_, _, c) in ref["factors"].items() if c == "matrix"]
    assert len(matrix) == 14 and all(ref["factors"][n][0] == pytest.approx(LR / 2) for n in matrix)
    # apply_ on the sharded model (init, readout hook, attention scale) == on the plain one, before and after a step
    for key in ("logits0", "logits1"):
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(ref[key]), rtol=1e-5, atol=1e-5 * torch.tensor(ref[key]).abs().max()
        )
