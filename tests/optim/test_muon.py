"""MuonAdamW: routing covers every parameter once, equals separate torch Muon + AdamW, state round trip,
LR schedulers and hooks act through param_groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layerwise.lab.model import build_model
from layerwise.multipliers import add_multipliers
from layerwise.names import is_multiplier
from layerwise.optim.muon import MuonAdamW, muon_param_groups, newton_schulz

VOCAB = 64


def _model(seed: int = 0, multipliers: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    m = build_model("nano", vocab_size=VOCAB)
    if multipliers:
        add_multipliers(m)
    return m


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randint(0, VOCAB, (2, 16), generator=g)
    return idx, torch.roll(idx, -1, 1)


def _train(model, opts, steps, scheds=()):
    for s in range(steps):
        for o in opts:
            o.zero_grad()
        idx, tgt = _batch(s)
        model(idx, tgt)[1].backward()
        for o in opts:
            o.step()
        for sch in scheds:
            sch.step()


def _reference_pair(model, lr, wd, mult_wd=2e-3):
    """torch.optim.Muon on 2-D block matrices, AdamW on the rest, same hyper-parameters (built by hand)."""
    muon_p, adam_decay, adam_nodecay, adam_mult = [], [], [], []
    for name, p in model.named_parameters():
        if is_multiplier(name):
            adam_mult.append(p)
        elif p.ndim == 2 and name.split(".")[0] == "layers":  # the lab model's blocks (hand-written)
            muon_p.append(p)
        elif p.ndim == 2:
            adam_decay.append(p)
        else:
            adam_nodecay.append(p)
    muon = torch.optim.Muon(muon_p, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    adam = torch.optim.AdamW(
        [
            {"params": adam_decay, "weight_decay": wd},
            {"params": adam_nodecay, "weight_decay": 0.0},
            {"params": adam_mult, "weight_decay": mult_wd},
        ],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    return muon, adam


def test_split_covers_every_parameter_once():
    model = _model()
    opt = MuonAdamW(model, lr=1e-3, weight_decay=0.1)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    assert {id(p) for p in seen} == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    want = {n for n, p in model.named_parameters() if n.endswith("_proj.weight")}
    assert muon_names == want
    assert {id(p) for g in opt.muon.param_groups for p in g["params"]} == {
        id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]
    }
    labels = {g["group"]: g for g in opt.param_groups}
    assert labels["multiplier"]["weight_decay"] == 2e-3 and labels["vector"]["weight_decay"] == 0.0
    assert labels["embedding"]["param_names"] == ["embed_tokens.weight"]
    assert labels["readout"]["param_names"] == ["lm_head.weight"]
    # inner optimizers hold the very same group dicts
    assert all(any(g is h for h in opt.param_groups) for g in opt.muon.param_groups + opt.adamw.param_groups)


def test_routing_from_named_parameters_and_group_dicts():
    model = _model()
    a = MuonAdamW(model.named_parameters(), lr=1e-3)
    b = MuonAdamW(
        [
            {
                "params": [p for _, p in model.named_parameters()],
                "param_names": [n for n, _ in model.named_parameters()],
                "lr": 1e-3,
                "group": "all",
            }
        ]
    )
    for opt in (a, b):
        muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
        assert muon == {id(p) for n, p in model.named_parameters() if n.endswith("_proj.weight")}
    assert {g["group"] for g in b.param_groups} == {"all"}
    with pytest.raises(ValueError, match="needs parameter names"):
        MuonAdamW(list(model.parameters()))
    with pytest.raises(ValueError, match="empty"):
        MuonAdamW([])
    forced = MuonAdamW(
        [{"params": [model.lm_head.weight], "use_muon": True}, {"params": [model.norm.weight], "use_muon": False}]
    )
    assert forced.muon.param_groups[0]["params"][0] is model.lm_head.weight


@pytest.mark.parametrize("multipliers", [True, False])
def test_matches_separate_muon_and_adamw(multipliers):
    m1 = _model(multipliers=multipliers)
    m2 = copy.deepcopy(m1)
    opt = MuonAdamW(m1, lr=3e-3, weight_decay=0.1)
    ref = _reference_pair(m2, 3e-3, 0.1)
    _train(m1, [opt], 3)
    _train(m2, list(ref), 3)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert any("momentum_buffer" in s for s in opt.state.values())
    assert any("exp_avg" in s for s in opt.state.values())


def test_state_dict_round_trip():
    model = _model()
    opt = MuonAdamW(model, lr=3e-3, weight_decay=0.1)
    _train(model, [opt], 2)
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = MuonAdamW(model2, lr=1.0, weight_decay=0.0)  # hyper-parameters come from the state dict
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 3e-3
    assert opt2.muon.param_groups == [g for g in opt2.param_groups if g["use_muon"]]
    assert opt2.muon.state is opt2.state and opt2.adamw.state is opt2.state
    for s in range(2, 4):
        for o, m in ((opt, model), (opt2, model2)):
            o.zero_grad()
            idx, tgt = _batch(s)
            m(idx, tgt)[1].backward()
            o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_lambda_lr_and_step_hooks():
    m1 = _model()
    m2 = copy.deepcopy(m1)
    opt = MuonAdamW(m1, lr=3e-3, weight_decay=0.1)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref = _reference_pair(m2, 3e-3, 0.1)
    ref_scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in ref]
    _train(m1, [opt], 3, [sched])
    _train(m2, list(ref), 3, ref_scheds)
    assert len(calls) == 3
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(3e-3 / 4)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_add_param_group_routes_and_closure():
    model = _model(multipliers=False)
    groups = muon_param_groups(model, 1e-3, 0.1)
    opt = MuonAdamW(groups[:1])  # only the block matrices
    assert opt.adamw is None
    rest = groups[1:]
    for g in rest:
        opt.add_param_group(g)
    assert opt.adamw is not None and len(opt.param_groups) == len(groups)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    idx, tgt = _batch(0)

    def closure():
        opt.zero_grad()
        loss = model(idx, tgt)[1]
        loss.backward()
        return loss

    w0 = model.lm_head.weight.detach().double().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    # the head (AdamW side, lr 1e-3, decay 0.1): a first Adam step is lr * g / (|g| + eps), written in float64
    g = model.lm_head.weight.grad.double()
    want = w0 * (1 - 1e-3 * 0.1) - 1e-3 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(model.lm_head.weight.detach().double(), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# float64 references written from the formulas (Keller Jordan's Muon; torch.optim.Muon's documented update)

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _ns64(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton–Schulz iteration in float64: X0 = G / ||G||_F (wide orientation), then
    X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = NS_COEFFS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / max(float(x.norm()), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_matches_float64_iteration(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = newton_schulz(g, NS_COEFFS, 5, 1e-7).double()
    ref = _ns64(g)
    assert ours.shape == shape
    # bfloat16 arithmetic (8-bit mantissa) over five iterations: ~1.5 % relative error here, while one
    # iteration fewer or other coefficients are off by tens of percent
    assert float((ours - ref).norm() / ref.norm()) < 0.03
    # what the iteration is for: every singular value pushed into Keller's band around 1 (from ~0.05 here)
    sv = torch.linalg.svdvals(ref)
    assert float(sv.min()) > 0.6 and float(sv.max()) < 1.25
    assert float(torch.linalg.svdvals(g.double() / g.double().norm()).min()) < 0.1


def test_muon_and_adamw_steps_match_float64_reference():
    """Three steps of MuonAdamW on one block matrix (Muon side) and one vector (AdamW side) against float64
    references: momentum ``B <- mu B + (1 - mu) g``, Nesterov update ``(1 - mu) g + mu B``, Newton–Schulz,
    decoupled decay ``theta (1 - lr wd)`` and Moonshot's lr adjustment ``0.2 sqrt(max(A, B))``; AdamW with
    bias correction on the vector."""
    gen = torch.Generator().manual_seed(5)
    w = nn.Parameter(torch.randn(24, 40, generator=gen) * 0.1)
    v = nn.Parameter(torch.randn(40, generator=gen))
    lr, wd, mu, b1, b2, eps = 0.02, 0.1, 0.95, 0.9, 0.95, 1e-8
    opt = MuonAdamW(
        [{"params": [w], "use_muon": True}, {"params": [v], "use_muon": False, "weight_decay": 0.0}],
        lr=lr,
        weight_decay=wd,
        momentum=mu,
        adam_betas=(b1, b2),
        adam_eps=eps,
    )
    w64, v64 = w.detach().double().clone(), v.detach().double().clone()
    buf = torch.zeros_like(w64)
    m, s = torch.zeros_like(v64), torch.zeros_like(v64)
    for t in range(1, 4):
        gw, gv = torch.randn(w.shape, generator=gen), torch.randn(v.shape, generator=gen)
        w.grad, v.grad = gw.clone(), gv.clone()
        opt.step()
        buf = mu * buf + (1 - mu) * gw.double()
        update = _ns64((1 - mu) * gw.double() + mu * buf)
        step_w = lr * 0.2 * max(w.shape) ** 0.5 * update
        w64 = w64 * (1 - lr * wd) - step_w
        m = b1 * m + (1 - b1) * gv.double()
        s = b2 * s + (1 - b2) * gv.double() ** 2
        v64 = v64 - lr * (m / (1 - b1**t)) / ((s / (1 - b2**t)).sqrt() + eps)
        # Muon's matrix update goes through bfloat16: ~1.5 % of the update's norm, accumulated over t steps
        assert float((w.detach().double() - w64).norm()) < 0.03 * t * float(step_w.norm())
        torch.testing.assert_close(v.detach().double(), v64, rtol=1e-5, atol=1e-6)
