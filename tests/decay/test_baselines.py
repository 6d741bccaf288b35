"""Baselines (uniform, TypeDecay, AWD, AdaDecay), the registry, and resume for every controller."""
from __future__ import annotations

import io
import math

import pytest
import torch

from layerwise.decay import AWD, DECAY_CONTROLLERS, AdaDecay, TypeDecay, UniformDecay, build_decay
from layerwise.names import named_parameters

from _decay_helpers import batches, block_linear_weights, layer_index, make_model, train_step


def _set_grads(model, seed=5, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = scale * torch.randn(p.shape, generator=g)


def test_uniform_is_noop():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    dec = UniformDecay(opt, model)
    assert len(opt.param_groups) == 1
    rows = dec.table()
    assert len(rows) == 14 and all(r["weight_decay"] == 0.1 and r["alpha"] is None for r in rows)


def test_typedecay_multipliers():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    dec = TypeDecay(opt, model)
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, w in block_linear_weights(model):
        want = 0.1 * (3.0 if ".mlp." in name else 0.6666)
        assert by_id[id(w)] == pytest.approx(want)
    assert by_id[id(model.embed_tokens.weight)] == 0.1 and by_id[id(model.lm_head.weight)] == 0.1
    assert {r["name"]: r["weight_decay"] for r in dec.table()}["layers.1.mlp.up_proj.weight"] == pytest.approx(0.3)


def test_awd_matches_algorithm_by_hand():
    """Two steps of AWD on AdamW (decoupled) against a float64 re-computation of Algorithm 1."""
    model = make_model()
    lr, eps = 0.1, 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=0.1, betas=(0.0, 0.0))
    dec = AWD(opt, model, beta=0.1)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    lam_bar, calib = 0.0, None
    for step in range(2):
        _set_grads(model, seed=step)
        w = {n: p.detach().double().clone() for n, p in named_parameters(model)}
        g = {n: p.grad.double().clone() for n, p in named_parameters(model)}
        gn = math.sqrt(sum(float(t.square().sum()) for t in g.values()))
        wn = math.sqrt(sum(float(t.square().sum()) for t in w.values()))
        if calib is None:
            calib = 0.1 * wn / gn  # lambda_awd=None: first-step λ equals the base decay
        lam_bar = 0.1 * lam_bar + 0.9 * calib * gn / wn
        opt.step()
        for n, p in named_parameters(model):
            # betas=(0, 0): m̂ = g, v̂ = g², so the Adam update is g/(|g|+eps)
            want = w[n] * (1 - lr * lam_bar) - lr * g[n] / (g[n].abs() + eps)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6, msg=n)
        assert dec.current() == pytest.approx(lam_bar, rel=1e-5)
    assert dec.table()[0]["weight_decay"] == pytest.approx(lam_bar, rel=1e-5)
    assert dec.version == 2 and dec.step == 2


def test_awd_coupled_with_adam_l2_and_explicit_lambda():
    model = make_model()
    lr, eps = 0.1, 1.0
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=eps, weight_decay=0.1)
    dec = AWD(opt, model, lambda_awd=3.0, beta=0.0)
    assert dec._modes == ["coupled"]
    _set_grads(model)
    w = {n: p.detach().double().clone() for n, p in named_parameters(model)}
    g = {n: p.grad.double().clone() for n, p in named_parameters(model)}
    gn = math.sqrt(sum(float(t.square().sum()) for t in g.values()))
    wn = math.sqrt(sum(float(t.square().sum()) for t in w.values()))
    lam = 3.0 * gn / wn
    opt.step()
    for n, p in named_parameters(model):
        gp = g[n] + lam * w[n]
        torch.testing.assert_close(p.detach().double(), w[n] - lr * gp / (gp.abs() + eps), rtol=1e-5, atol=1e-6)


def _adadecay_reference(names, grads, numel, wd0, slope):
    r = [math.sqrt(float(g.double().square().sum())) / math.sqrt(n) for g, n in zip(grads, numel)]
    out = []
    for i, name in enumerate(names):
        peers = [r[j] for j, m in enumerate(names) if layer_index(m) == layer_index(name)]
        mu = sum(peers) / len(peers)
        sd = math.sqrt(sum((x - mu) ** 2 for x in peers) / len(peers))
        z = (r[i] - mu) / (sd + 1e-12)
        out.append(wd0 * 2.0 / (1.0 + math.exp(-slope * z)))
    return out


@pytest.mark.parametrize("kind", ["adamw", "adam_l2"])
def test_adadecay_matches_hand_computation(kind):
    model = make_model()
    lr, eps, wd0 = 0.1, 1.0, 0.2
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = cls(model.parameters(), lr=lr, eps=eps, weight_decay=wd0)
    dec = AdaDecay(opt, model, slope=2.0)
    _set_grads(model)
    mats = block_linear_weights(model)
    lam = _adadecay_reference([n for n, _ in mats], [p.grad for _, p in mats], [p.numel() for _, p in mats], wd0, 2.0)
    lam_by = {n: l for (n, _), l in zip(mats, lam)}
    w = {n: p.detach().double().clone() for n, p in named_parameters(model)}
    g = {n: p.grad.double().clone() for n, p in named_parameters(model)}
    opt.step()
    assert [r["weight_decay"] for r in dec.table()] == pytest.approx(lam, rel=1e-5)
    assert len(set(round(v, 8) for v in lam)) > 5 and all(0 < v < 2 * wd0 for v in lam)
    for n, p in named_parameters(model):
        wd = lam_by.get(n, wd0)
        if kind == "adamw":
            want = w[n] * (1 - lr * wd) - lr * g[n] / (g[n].abs() + eps)
        else:
            gp = g[n] + wd * w[n]
            want = w[n] - lr * gp / (gp.abs() + eps)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------- registry / resume


def test_registry_and_build_decay_errors():
    assert set(DECAY_CONTROLLERS) == {"uniform", "alphadecay", "awd", "adadecay", "typedecay"}
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    with pytest.raises(ValueError, match="unknown decay controller 'alpha'"):
        build_decay("alpha", opt, model)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['intervall'\]"):
        build_decay("alphadecay", opt, model, intervall=3)
    with pytest.raises(ValueError, match="mode"):
        build_decay("awd", opt, model, mode="both")
    with pytest.raises(ValueError, match="no parameter group has a nonzero weight_decay"):
        AWD(torch.optim.AdamW(model.parameters(), weight_decay=0.0), model)
    assert not opt._optimizer_step_post_hooks and not opt._optimizer_step_pre_hooks
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        build_decay("alphadecay", object(), model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        build_decay("typedecay", opt, object())


OPTIONS = {"uniform": {}, "alphadecay": {"interval": 3}, "awd": {}, "adadecay": {}, "typedecay": {}}


def _run(name: str, n_total: int, split_at: int | None):
    data = batches(n_total, seed=7)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.2)
    dec = build_decay(name, opt, model, **OPTIONS[name])
    if split_at is not None:
        for x in data[:split_at]:
            train_step(model, opt, x)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "decay": dec.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        model = make_model(seed=1)
        model.load_state_dict(ck["model"])
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.2)
        dec = build_decay(name, opt, model, **OPTIONS[name])
        opt.load_state_dict(ck["opt"])
        dec.load_state_dict(ck["decay"])
        data = data[split_at:]
    for x in data:
        train_step(model, opt, x)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, dec


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_resume_equals_uninterrupted_every_controller(name):
    full, dec_full = _run(name, 6, None)
    res, dec_res = _run(name, 6, 3)
    for n in full:
        torch.testing.assert_close(res[n], full[n], rtol=1e-5, atol=1e-6, msg=n)
    assert dec_res.step == dec_full.step == 6 and dec_res.version == dec_full.version
    rows_f, rows_r = dec_full.table(), dec_res.table()
    assert [r["name"] for r in rows_f] == [r["name"] for r in rows_r]
    assert [r["weight_decay"] for r in rows_r] == pytest.approx([r["weight_decay"] for r in rows_f], rel=1e-4)
    assert set(rows_f[0]) >= {"name", "alpha", "weight_decay"}
