"""clip_grad_norm_ with exclusions: torch parity, exclusion semantics, separate clip, argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.optim.clip import clip_grad_norm_


def _params(seed: int = 0, scale: float = 1.0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=g)) for s in ((3, 4), (5,), (2, 2, 2))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return ps


def _clone(ps):
    out = []
    for p in ps:
        q = nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("exclude", [None, []])
def test_matches_torch_without_exclusions(norm_type, foreach, exclude):
    ours = _params(scale=3.0)
    ref = _clone(ours)
    t_ours = clip_grad_norm_(ours, 0.5, norm_type, foreach=foreach, exclude=exclude)
    t_ref = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type, foreach=foreach)
    torch.testing.assert_close(t_ours, t_ref, rtol=0, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_exclusion_changes_the_decision():
    """Included grads have norm 0.6 < max_norm 1; the multiplier's 5.0 would push the total over and clip."""
    w = nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([0.36, 0.48], dtype=torch.float32)  # norm 0.6
    mult = nn.Parameter(torch.ones(2))
    mult.grad = torch.tensor([3.0, 4.0])  # norm 5
    # reference: including it clips everything
    w2, m2 = _clone([w, mult])
    total_incl = clip_grad_norm_([w2, m2], 1.0)
    assert total_incl.item() == pytest.approx((0.6**2 + 25) ** 0.5, rel=1e-6)
    assert w2.grad.norm().item() < 0.6 * 0.2
    # excluding it: total is the included norm, nothing is scaled
    total = clip_grad_norm_([w, mult], 1.0, exclude=[mult])
    assert total.item() == pytest.approx(0.6, rel=1e-6)
    assert torch.equal(w.grad, torch.tensor([0.36, 0.48]))
    assert torch.equal(mult.grad, torch.tensor([3.0, 4.0]))


def test_exclusion_when_included_set_must_clip_float64_reference():
    ps = _params(seed=1, scale=2.0)
    before = [p.grad.clone() for p in ps]
    total = clip_grad_norm_(ps, 0.5, exclude=[ps[1]])
    ref_norm = torch.cat([before[0].double().flatten(), before[2].double().flatten()]).norm()
    torch.testing.assert_close(total.double(), ref_norm, rtol=1e-6, atol=0)
    coef = 0.5 / (ref_norm + 1e-6)
    torch.testing.assert_close(ps[0].grad.double(), before[0].double() * coef, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ps[2].grad.double(), before[2].double() * coef, rtol=1e-6, atol=1e-7)
    assert torch.equal(ps[1].grad, before[1])


def test_clip_excluded_separately():
    ps = _params(seed=2, scale=0.01)  # included set far below max_norm
    ps[1].grad = torch.full((5,), 10.0)
    before = [p.grad.clone() for p in ps]
    total = clip_grad_norm_(ps, 1.0, exclude=[ps[1]], clip_excluded=2.0)
    assert total.item() == pytest.approx(torch.cat([before[0].flatten(), before[2].flatten()]).norm().item(), rel=1e-6)
    assert torch.equal(ps[0].grad, before[0]) and torch.equal(ps[2].grad, before[2])
    assert ps[1].grad.norm().item() == pytest.approx(2.0, rel=1e-5)


def test_named_parameters_and_names():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model(torch.randn(4, 3)).pow(2).sum().mul(100).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    total = clip_grad_norm_(model.named_parameters(), 1e-3, exclude=["1.weight", "module.1.bias"])
    incl = torch.cat([ref[0].flatten(), ref[1].flatten()]).norm()
    assert total.item() == pytest.approx(incl.item(), rel=1e-6)
    assert torch.equal(model[1].weight.grad, ref[2]) and torch.equal(model[1].bias.grad, ref[3])
    assert model[0].weight.grad.norm().item() < ref[0].norm().item()
    # (name, param) pairs in exclude are matched by identity
    total2 = clip_grad_norm_(list(model.parameters()), 1e9, exclude=list(model[0].named_parameters()))
    assert total2.item() == pytest.approx(torch.cat([ref[2].flatten(), ref[3].flatten()]).norm().item(), rel=1e-6)


def test_params_without_grad_and_errors():
    ps = _params()
    ps.append(nn.Parameter(torch.ones(3)))  # no grad
    clip_grad_norm_(ps, 1.0, exclude=[ps[0]])
    assert ps[-1].grad is None
    assert clip_grad_norm_([ps[0]], 1.0, exclude=[ps[0]]).item() == 0.0
    with pytest.raises(ValueError, match="unnamed"):
        clip_grad_norm_(ps, 1.0, exclude=["0.weight"])
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        clip_grad_norm_([("a", ps[0])], 1.0, exclude=["nope"])
    with pytest.raises(TypeError, match="parameters\\[1\\]"):
        clip_grad_norm_([ps[0], 3.0], 1.0)
    with pytest.raises(TypeError, match="exclude items"):
        clip_grad_norm_(ps, 1.0, exclude=[1])
