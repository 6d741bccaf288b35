"""Baselines (uniform, TypeDecay, AWD, AdaDecay) against hand computations, and the registry (resume for every
controller: test_decay_properties.py)."""

from __future__ import annotations

import math

import pytest
import torch
from _decay_helpers import block_linear_weights, hf_llama, layer_index, make_model, per_matrix_optimizer

from layerwise.decay import AWD, DECAY_CONTROLLERS, AdaDecay, GroupLayoutError, TypeDecay, UniformDecay, build_decay
from layerwise.names import named_parameters
from layerwise.optim import param_groups


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
    with pytest.raises(GroupLayoutError, match=r"TypeDecay.*per_matrix=True"):
        TypeDecay(torch.optim.AdamW(model.parameters(), weight_decay=0.1), model)
    opt = per_matrix_optimizer(model, lr=1e-3, weight_decay=0.1)
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
    assert opt.param_groups[0]["weight_decay"] == 0.1 == opt.param_groups[0]["initial_weight_decay"]
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
        assert opt.param_groups[0]["weight_decay"] == dec.current()  # what the optimizer applied
    assert dec.table()[0]["weight_decay"] == pytest.approx(lam_bar, rel=1e-5)
    assert dec.version == 2 and dec.step == 2


def test_awd_coupled_with_adam_l2_and_explicit_lambda():
    model = make_model()
    lr, eps = 0.1, 1.0
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=eps, weight_decay=0.1)
    AWD(opt, model, lambda_awd=3.0, beta=0.0)
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


def _adadecay_reference(names, grads, numel, wd0, slope, norm="rms", eps=1e-8, block=None):
    block = block or layer_index
    r = [
        math.sqrt(float(g.double().square().sum())) / (math.sqrt(n) if norm == "rms" else 1.0)
        for g, n in zip(grads, numel)
    ]
    out = []
    for i, name in enumerate(names):
        peers = [r[j] for j, m in enumerate(names) if block(m) == block(name)]
        mu = sum(peers) / len(peers)
        sd = math.sqrt(sum((x - mu) ** 2 for x in peers) / len(peers))
        z = (r[i] - mu) / (sd + eps)
        out.append(wd0 * 2.0 / (1.0 + math.exp(-slope * z)))
    return out


@pytest.mark.parametrize("kind", ["adamw", "adam_l2"])
def test_adadecay_matches_hand_computation(kind):
    """The per-step RMS variant (norm='rms', interval=1)."""
    model = make_model()
    lr, eps, wd0 = 0.1, 1.0, 0.2
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = per_matrix_optimizer(model, cls, lr=lr, eps=eps, weight_decay=wd0)
    dec = AdaDecay(opt, model, slope=2.0, norm="rms", interval=1)
    _set_grads(model)
    mats = block_linear_weights(model)
    lam = _adadecay_reference([n for n, _ in mats], [p.grad for _, p in mats], [p.numel() for _, p in mats], wd0, 2.0)
    lam_by = {n: v for (n, _), v in zip(mats, lam)}
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


def test_adadecay_default_is_the_papers_baseline_raw_norm_slope4_every_interval():
    """Defaults: raw ‖∇W‖, θ = 2σ(4z), recomputed before every interval-th step from that step's gradients,
    wd0 before the first recomputation, held in between (checked on the AdamW update, betas = 0)."""
    import inspect

    sig = inspect.signature(AdaDecay.__init__).parameters
    assert (sig["slope"].default, sig["interval"].default, sig["norm"].default) == (4.0, 500, "raw")
    model = make_model()
    lr, eps, wd0 = 0.1, 1.0, 0.2
    opt = per_matrix_optimizer(model, lr=lr, eps=eps, weight_decay=wd0, betas=(0.0, 0.0))
    dec = AdaDecay(opt, model, interval=3)
    mats = block_linear_weights(model)
    names = [n for n, _ in mats]
    lam = {n: wd0 for n in names}
    for step in range(7):
        _set_grads(model, seed=10 + step)
        if (step + 1) % 3 == 0:
            ref = _adadecay_reference(
                names, [p.grad for _, p in mats], [p.numel() for _, p in mats], wd0, 4.0, norm="raw"
            )
            lam = dict(zip(names, ref))
        w = {n: p.detach().double().clone() for n, p in named_parameters(model)}
        g = {n: p.grad.double().clone() for n, p in named_parameters(model)}
        opt.step()
        for n, p in named_parameters(model):
            want = w[n] * (1 - lr * lam.get(n, wd0)) - lr * g[n] / (g[n].abs() + eps)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6, msg=f"{n} step {step}")
        assert [r["weight_decay"] for r in dec.table()] == pytest.approx([lam[n] for n in names], rel=1e-5)
    assert dec.version == 3 and dec.last_update_step == 5  # recomputed before steps 3 and 6
    # raw norms: the larger MLP matrices read larger gradient norms, so they get more decay
    mlp = [lam[n] for n in names if ".mlp." in n]
    att = [lam[n] for n in names if ".self_attn." in n]
    assert sum(mlp) / len(mlp) > sum(att) / len(att)


def test_adadecay_authors_modules_bias_and_untuned():
    model = hf_llama()
    lr, eps, wd0 = 0.1, 1.0, 0.2
    groups = param_groups(model, lr=lr, weight_decay=wd0, per_matrix="authors")  # norms at 0 there: untuned sets wd0
    opt = torch.optim.AdamW(groups, lr=lr, eps=eps, betas=(0.0, 0.0))
    dec = AdaDecay(opt, model, interval=1, modules="authors")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][1:-1]
    assert dec.names == [n + ".weight" for n, _ in linears]
    _set_grads(model, seed=3)
    hf_block = lambda n: n.split(".")[2]  # "model.layers.N...." (hand-written, as the authors' split('.')[2])
    ref = _adadecay_reference(
        dec.names, [m.weight.grad for _, m in linears], [1] * len(linears), wd0, 4.0, norm="raw", block=hf_block
    )
    lam = {}
    for (_, m), v in zip(linears, ref):
        lam[id(m.weight)] = lam[id(m.bias)] = v
    w = {id(p): (n, p.detach().double().clone(), p.grad.double().clone()) for n, p in model.named_parameters()}
    opt.step()
    for p in model.parameters():
        n, w0, g = w[id(p)]
        want = w0 * (1 - lr * lam.get(id(p), wd0)) - lr * g / (g.abs() + eps)  # norms too: untuned at wd0
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6, msg=n)


def test_awd_authors_lambda_is_100_wd0():
    model = make_model()
    lr, eps = 0.1, 1.0
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=eps, weight_decay=1e-5)
    dec = AWD(opt, model, lambda_awd="authors")
    _set_grads(model)
    w = {n: p.detach().double().clone() for n, p in named_parameters(model)}
    g = {n: p.grad.double().clone() for n, p in named_parameters(model)}
    gn = math.sqrt(sum(float(t.square().sum()) for t in g.values()))
    wn = math.sqrt(sum(float(t.square().sum()) for t in w.values()))
    lam_bar = 0.9 * (100 * 1e-5) * gn / wn  # λ̄_1 = 0.1·0 + 0.9·λ_awd·‖g‖/‖w‖
    opt.step()
    assert dec.current() == pytest.approx(lam_bar, rel=1e-5)
    for n, p in named_parameters(model):
        gp = g[n] + lam_bar * w[n]
        torch.testing.assert_close(p.detach().double(), w[n] - lr * gp / (gp.abs() + eps), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="lambda_awd"):
        AWD(torch.optim.Adam(model.parameters(), weight_decay=0.1), model, lambda_awd="x100")


def test_adadecay_errors_name_the_field():
    model = make_model()
    opt = per_matrix_optimizer(model, weight_decay=0.1)
    for kw, field in [
        ({"norm": "l1"}, "norm"),
        ({"interval": 0}, "interval"),
        ({"modules": "all"}, "modules"),
        ({"slope": -1.0}, "slope"),
        ({"modules": "authors", "select": "mlp"}, "select"),
    ]:
        with pytest.raises(ValueError, match=field):
            AdaDecay(opt, model, **kw)
    assert not opt._optimizer_step_pre_hooks and "initial_weight_decay" not in opt.param_groups[0]


# --------------------------------------------------------------------------------- registry / resume


def test_registry_and_build_decay_errors():
    assert set(DECAY_CONTROLLERS) == {"uniform", "alphadecay", "awd", "adadecay", "typedecay"}
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    with pytest.raises(ValueError, match="unknown decay controller 'alpha'"):
        build_decay("alpha", opt, model)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['intervall'\]"):
        build_decay("alphadecay", opt, model, intervall=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['mode'\]"):  # the optimizer applies the decay its way
        build_decay("awd", opt, model, mode="decoupled")
    with pytest.raises(ValueError, match="no parameter group has a nonzero weight_decay"):
        AWD(torch.optim.AdamW(model.parameters(), weight_decay=0.0), model)
    assert not opt._optimizer_step_post_hooks and not opt._optimizer_step_pre_hooks
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        build_decay("alphadecay", object(), model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        build_decay("typedecay", opt, object())
