"""AlphaDecay: the map, the α it uses, when it recomputes, the group layout it needs, optimizer semantics, state."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from _decay_helpers import batches, block_linear_weights, hf_llama, make_model, per_matrix_optimizer, train_step
from torch import nn

import layerwise as lw
import layerwise.decay.alphadecay as ad_mod
from layerwise.decay import AlphaDecay, GroupLayoutError, linear_decay_map
from layerwise.names import named_parameters

# ------------------------------------------------------------------------------------------- the map


def test_map_equals_formula():
    alpha = [2.0, 3.5, 2.75, 5.0, 4.1]
    wd0, s1, s2 = 0.1, 0.6666, 3.0
    got = linear_decay_map(alpha, wd0, s1, s2)
    lo, hi = min(alpha), max(alpha)
    want = [wd0 * (s1 + (s2 - s1) * (a - lo) / (hi - lo)) for a in alpha]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx(s1 * wd0) and got[3] == pytest.approx(s2 * wd0)


def test_map_all_equal_alpha_gives_wd0():
    assert linear_decay_map([2.3] * 4, 0.05).tolist() == [0.05] * 4
    assert linear_decay_map([2.3], 0.05).tolist() == [0.05]


def test_map_nan_alpha_gets_wd0_and_is_ignored_for_range():
    got = linear_decay_map([2.0, float("nan"), 4.0, 3.0], 1.0, 0.5, 2.0)
    assert got.tolist() == pytest.approx([0.5, 1.0, 2.0, 1.25])
    assert linear_decay_map([float("nan")] * 3, 0.2).tolist() == [0.2] * 3


def test_map_preserve_mean_and_per_module_base():
    alpha, numel = [2.0, 3.0, 6.0], [100, 400, 50]
    got = linear_decay_map(alpha, 0.1, numel=numel, preserve_mean=True)
    n = torch.tensor(numel, dtype=torch.float64)
    assert float((n * got).sum() / n.sum()) == pytest.approx(0.1, rel=1e-12)
    plain = linear_decay_map(alpha, 0.1)
    assert (got / plain).tolist() == pytest.approx([float(got[0] / plain[0])] * 3)  # one common factor
    base = [0.1, 0.2, 0.4]
    per = linear_decay_map(alpha, base, 1.0, 3.0)
    assert per.tolist() == pytest.approx([0.1 * 1.0, 0.2 * (1 + 2 * 0.25), 0.4 * 3.0])
    with pytest.raises(ValueError, match="numel"):
        linear_decay_map(alpha, 0.1, preserve_mean=True)


# --------------------------------------------------------------------------------- α and the decays


def _hill_reference(w: torch.Tensor) -> float:
    lam = torch.linalg.svdvals(w.detach().double()).pow(2).sort().values
    i = lam.numel() // 2
    tail = lam[i:]
    return 1.0 + tail.numel() / float(torch.log(tail / lam[i]).sum())


def test_alphadecay_alpha_and_decays_match_references():
    model = make_model()
    opt = per_matrix_optimizer(model, lr=1e-3, weight_decay=0.1)
    dec = AlphaDecay(opt, model, interval=10)
    rows = dec.table()
    mats = block_linear_weights(model)
    assert [r["name"] for r in rows] == [n for n, _ in mats]
    assert len(rows) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    ref = [_hill_reference(w) for _, w in mats]
    assert [r["alpha"] for r in rows] == pytest.approx(ref, rel=1e-4)
    lo, hi = min(ref), max(ref)
    want = [0.1 * (0.6666 + (3.0 - 0.6666) * (a - lo) / (hi - lo)) for a in ref]
    assert [r["weight_decay"] for r in rows] == pytest.approx(want, rel=1e-3, abs=1e-6)
    # the optimizer's groups hold those decays, one group per analysed matrix
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    for (_, w), r in zip(mats, rows):
        g = by_id[id(w)]
        assert len(g["params"]) == 1 and g["weight_decay"] == r["weight_decay"]


def test_select_controls_only_its_matrices_and_leaves_every_other_key_alone():
    model = make_model()
    names = dict(named_parameters(model))
    mlp = [n for n in names if ".mlp." in n]
    groups = lw.param_groups(model, lr=2e-3, weight_decay=0.1, per_matrix=r"\.mlp\.")
    for g in groups:
        g["betas"] = (0.8, 0.9)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    dec = AlphaDecay(opt, model, interval=5, select=r"\.mlp\.")
    assert [r["name"] for r in dec.table()] == mlp
    wd = {r["name"]: r["weight_decay"] for r in dec.table()}
    assert len(set(wd.values())) == len(mlp)
    for g, old in zip(opt.param_groups, before):
        pn = g["param_names"]
        if any(n in mlp for n in pn):  # a controlled matrix: alone, its decay set, its base recorded
            assert pn in ([n] for n in mlp) and g["weight_decay"] == wd[pn[0]]
            assert {k: v for k, v in g.items() if k not in ("params", "weight_decay", "initial_weight_decay")} == {
                k: v for k, v in old.items() if k != "weight_decay"
            }
            assert g["initial_weight_decay"] == old["weight_decay"] == 0.1
        else:  # attention matrices, embedding, head, norms: untouched
            assert {k: v for k, v in g.items() if k != "params"} == old
    assert sorted(n for g in opt.param_groups for n in g["param_names"]) == sorted(names)


def test_recomputation_exactly_at_0_interval_2interval(monkeypatch):
    calls: list[int] = []
    real = ad_mod.estimate_alphas
    holder: dict = {}

    def spy(*a, **k):
        calls.append(holder["dec"].step if "dec" in holder else 0)
        return real(*a, **k)

    monkeypatch.setattr(ad_mod, "estimate_alphas", spy)
    model = make_model()
    opt = per_matrix_optimizer(model, lr=1e-2, weight_decay=0.1)
    dec = AlphaDecay(opt, model, interval=3)
    holder["dec"] = dec
    assert calls == [0] and dec.version == 1 and dec.last_update_step == 0
    seen = []
    for x in batches(7):
        before = [g["weight_decay"] for g in opt.param_groups]
        train_step(model, opt, x)
        seen.append((dec.step, dec.version, dec.last_update_step))
        changed = [g["weight_decay"] for g in opt.param_groups] != before
        assert changed == (dec.step % 3 == 0), f"decays changed at step {dec.step}"
    assert calls == [0, 3, 6]
    assert seen[-1] == (7, 3, 6)


def test_new_decay_applies_from_next_step():
    """The decay set after step k is the one step k+1 uses: check with zero gradients (AdamW: p *= 1 - lr*wd)."""
    model = make_model()
    opt = per_matrix_optimizer(model, lr=0.5, weight_decay=0.1)
    dec = AlphaDecay(opt, model, interval=1)
    w = model.layers[0].mlp.up_proj.weight
    for _ in range(2):
        wd = next(g["weight_decay"] for g in opt.param_groups if g["params"][0] is w)
        before = w.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        torch.testing.assert_close(w.detach(), before * (1 - 0.5 * wd), rtol=1e-6, atol=1e-7)
    assert dec.version == 3


# ------------------------------------------------------------------- coupled vs decoupled, one step


@pytest.mark.parametrize("kind", ["adam_l2", "adamw"])
def test_one_step_matches_hand_computation(kind):
    model = make_model()
    lr, eps, wd0 = 0.1, 1.0, 0.5  # large eps keeps the update linear enough to depend on the decay
    cls = torch.optim.Adam if kind == "adam_l2" else torch.optim.AdamW
    opt = per_matrix_optimizer(model, cls, lr=lr, eps=eps, weight_decay=wd0)
    dec = AlphaDecay(opt, model, interval=100)
    lam = {r["name"]: r["weight_decay"] for r in dec.table()}
    assert len(set(lam.values())) > 2
    g = torch.Generator().manual_seed(5)
    before = {}
    for n, p in named_parameters(model):
        p.grad = 0.01 * torch.randn(p.shape, generator=g)
        before[n] = (p.detach().double().clone(), p.grad.double().clone())
    opt.step()
    for n, p in named_parameters(model):
        w, gr = before[n]
        wd = lam.get(n, wd0)
        if kind == "adam_l2":  # g' = g + λw; first Adam step: m̂ = g', v̂ = g'^2
            gp = gr + wd * w
            want = w - lr * gp / (gp.abs() + eps)
        else:  # decoupled: w(1 - lr λ) - lr g/(|g| + eps)
            want = w * (1 - lr * wd) - lr * gr / (gr.abs() + eps)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6, msg=n)


def _zero_grad_decay_check(model, opt, lr):
    """With zero gradients a decoupled step multiplies each matrix by (1 - lr·λ) exactly."""
    lam = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    before = {n: p.detach().clone() for n, p in named_parameters(model)}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in named_parameters(model):
        torch.testing.assert_close(p.detach(), before[n] * (1 - lr * lam[id(p)]), rtol=1e-6, atol=1e-7, msg=n)


def test_works_with_alphaadam():
    import layerwise.optim.alphaadam as alphaadam

    model = make_model()
    opt = per_matrix_optimizer(model, alphaadam.AlphaAdam, lr=0.5, weight_decay=0.1, fast=False)
    dec = AlphaDecay(opt, model, interval=2)
    _zero_grad_decay_check(model, opt, 0.5)
    for x in batches(2):
        train_step(model, opt, x)
    assert dec.version == 2 and dec.step == 3


def test_works_with_torch_muon_on_matrices_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16, bias=False), nn.Tanh(), nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 8, bias=False)
    )
    opt = torch.optim.Muon([{"params": [p]} for p in model.parameters()], lr=0.5, weight_decay=0.1)
    dec = AlphaDecay(opt, model, interval=2)
    assert len(dec.table()) == 3 and len(opt.param_groups) == 3
    _zero_grad_decay_check(model, opt, 0.5)
    x = torch.randn(4, 12)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert dec.step == 4 and dec.version == 3


def test_works_with_muon_adamw_wrapper():
    import layerwise.optim.muon as muon

    model = make_model()
    with pytest.raises(GroupLayoutError, match=r"MuonAdamW\(layerwise\.param_groups\(.*per_matrix=True\)"):
        AlphaDecay(muon.MuonAdamW(model, lr=0.5, weight_decay=0.1), model)  # its own groups: one per class
    opt = muon.MuonAdamW(lw.param_groups(model, lr=0.5, weight_decay=0.1, per_matrix=True), lr=0.5)
    n_before = len(opt.param_groups)
    dec = AlphaDecay(opt, model, interval=2)
    assert len(opt.param_groups) == n_before and len(opt.muon.param_groups) == 14  # the 14 block matrices
    assert all(g["use_muon"] for g in opt.muon.param_groups)
    inner_ids = {id(g) for g in opt.muon.param_groups} | {id(g) for g in opt.adamw.param_groups}
    assert {id(g) for g in opt.param_groups} == inner_ids
    _zero_grad_decay_check(model, opt, 0.5)
    for x in batches(2):
        train_step(model, opt, x)
    assert dec.version == 2


def test_param_groups_give_every_documented_selection_its_layout():
    """For each selection a controller takes, param_groups(per_matrix=...) builds a layout it accepts, and the
    merged layout is refused with a GroupLayoutError that names the tensors and shows that call."""
    model = hf_llama(hidden=64, intermediate=96)
    q_names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    cases = [
        ({}, True, 14),
        ({"select": r"\.mlp\."}, r"\.mlp\.", 6),
        ({"select": q_names}, q_names, 2),
        ({"modules": "authors"}, "authors", 13),
    ]
    for opts, want, n in cases:
        assert AlphaDecay.per_matrix_for(**opts) == want
        with pytest.raises(GroupLayoutError) as err:
            AlphaDecay(torch.optim.AdamW(model.parameters(), weight_decay=0.1), model, **opts)
        msg = str(err.value)
        assert f"per_matrix={want!r}" in msg and "AdamW(layerwise.param_groups(model" in msg
        assert re.search(r"holds model\.layers\.\d\.\w+\.\w+_proj\.weight together with \d+ other", msg), msg
        opt = torch.optim.AdamW(lw.param_groups(model, lr=1e-3, weight_decay=0.1, per_matrix=want))
        dec = AlphaDecay(opt, model, **opts)
        assert len(dec.names) == n
        for name in dec.names:  # alone in its group, or (authors) with its module's bias only
            g = next(g for g in opt.param_groups if name in g["param_names"])
            assert g["param_names"] in ([name], [name, name.removesuffix("weight") + "bias"]), g["param_names"]
            assert g["weight_decay"] == dec.table()[dec.names.index(name)]["weight_decay"]
    callable_select = lambda n, p: n.endswith("down_proj.weight")
    opt = torch.optim.AdamW(lw.param_groups(model, lr=1e-3, weight_decay=0.1, per_matrix=callable_select))
    assert len(AlphaDecay(opt, model, select=callable_select).names) == 2


# ------------------------------------------------------------------------------------ state / resume


def _run(n_total: int, split_at: int | None, **opts) -> tuple[dict, list[dict]]:
    data = batches(n_total)
    model = make_model()
    opt = per_matrix_optimizer(model, lr=2e-2, weight_decay=0.2)
    dec = AlphaDecay(opt, model, interval=3, **opts)
    if split_at is None:
        for x in data:
            train_step(model, opt, x)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, dec.table()
    for x in data[:split_at]:
        train_step(model, opt, x)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "decay": dec.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = make_model(seed=1)  # different initial weights: everything must come from the checkpoint
    model2.load_state_dict(ck["model"])
    opt2 = per_matrix_optimizer(model2, lr=2e-2, weight_decay=0.2)
    dec2 = AlphaDecay(opt2, model2, interval=3, **opts)
    opt2.load_state_dict(ck["opt"])
    dec2.load_state_dict(ck["decay"])
    assert dec2.table() == dec.table() and dec2.state_dict() == dec.state_dict()
    for x in data[split_at:]:
        train_step(model2, opt2, x)
    return {n: p.detach().clone() for n, p in model2.named_parameters()}, dec2.table()


@pytest.mark.parametrize("opts", [{}, {"ema": 0.5, "preserve_mean": True}])
def test_resume_equals_uninterrupted(opts):
    full, table_full = _run(8, None, **opts)
    resumed, table_res = _run(8, 4, **opts)
    for n in full:
        torch.testing.assert_close(resumed[n], full[n], rtol=1e-5, atol=1e-6, msg=n)
    for a, b in zip(table_full, table_res):
        assert a["name"] == b["name"]
        assert a["weight_decay"] == pytest.approx(b["weight_decay"], rel=1e-4)


def test_ema_smooths_alpha():
    model = make_model()
    opt = per_matrix_optimizer(model, lr=5e-2, weight_decay=0.1)
    dec = AlphaDecay(opt, model, interval=2, ema=0.75)
    a0 = dec.alpha.clone()
    for x in batches(2):
        train_step(model, opt, x)
    torch.testing.assert_close(dec.alpha, 0.75 * a0 + 0.25 * dec.alpha_raw, rtol=1e-12, atol=0)
    assert not torch.equal(dec.alpha_raw, a0)


def test_ks_estimator_and_shape_correction_rows():
    model = make_model()
    opt = per_matrix_optimizer(model, lr=1e-3, weight_decay=0.1)
    dec = AlphaDecay(opt, model, estimator="ks")
    rows = dec.table()
    assert all({"name", "alpha", "weight_decay", "xmin", "ks"} <= set(r) for r in rows)
    m1, m2 = make_model(), make_model()
    plain = AlphaDecay(per_matrix_optimizer(m1, weight_decay=0.1), m1)
    opt2 = per_matrix_optimizer(m2, lr=1e-3, weight_decay=0.1)
    corrected = AlphaDecay(opt2, m2, shape_correction=True)
    # the correction moves square (attention) and rectangular (MLP) matrices by different amounts
    shift = corrected.alpha - plain.alpha
    is_mlp = torch.tensor([".mlp." in n for n in corrected.names])
    assert float(shift[is_mlp].mean()) < float(shift[~is_mlp].mean()) - 0.3


def test_nan_alpha_module_gets_wd0():
    model = make_model()
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight.zero_()
    opt = per_matrix_optimizer(model, lr=1e-3, weight_decay=0.1)
    dec = AlphaDecay(opt, model)
    row = next(r for r in dec.table() if r["name"] == "layers.0.self_attn.k_proj.weight")
    assert row["alpha"] is None and row["weight_decay"] == 0.1


# -------------------------------------------------------------------------------------------- errors


def test_errors_name_the_field():
    model = make_model()
    opt = per_matrix_optimizer(model, weight_decay=0.1)
    with pytest.raises(ValueError, match="s1"):
        AlphaDecay(opt, model, s1=3.0, s2=1.0)
    with pytest.raises(ValueError, match="interval"):
        AlphaDecay(opt, model, interval=0)
    with pytest.raises(ValueError, match="estimator"):
        AlphaDecay(opt, model, estimator="median")
    with pytest.raises(ValueError, match="ema"):
        AlphaDecay(opt, model, ema=1.0)
    with pytest.raises(ValueError, match="no weight matrix"):
        AlphaDecay(torch.optim.AdamW(nn.LayerNorm(4).parameters()), nn.LayerNorm(4))
    partial = torch.optim.AdamW([p for n, p in model.named_parameters() if "up_proj" not in n])
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.weight"):
        AlphaDecay(partial, model)
    two = torch.optim.AdamW(  # per-matrix groups with two base decays
        lw.param_groups(model, lr=1e-3, weight_decay=0.05, rules=[(r"\.mlp\.", {"weight_decay": 0.1})], per_matrix=True)
    )
    with pytest.raises(ValueError, match="wd0 is ambiguous"):
        AlphaDecay(two, model)
    dec = AlphaDecay(two, model, wd0="group")
    assert dec.wd0 == [0.1 if ".mlp." in n else 0.05 for n in dec.names]


def test_merged_groups_are_refused_and_left_as_they_were():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    with pytest.raises(GroupLayoutError, match=r"14 of its 14 matrices share a group.*per_matrix=True"):
        AlphaDecay(opt, model)
    assert isinstance(GroupLayoutError("x"), ValueError) and lw.GroupLayoutError is GroupLayoutError
    assert len(opt.param_groups) == 1 and set(opt.param_groups[0]) == set(opt.defaults) | {"params"}
    assert not opt._optimizer_step_post_hooks and not opt._optimizer_step_pre_hooks


def test_state_dict_rejects_other_matrices():
    model = make_model()
    dec = AlphaDecay(per_matrix_optimizer(model, weight_decay=0.1), model)
    state = dec.state_dict()
    state["names"] = state["names"][::-1]
    with pytest.raises(ValueError, match="different matrices"):
        dec.load_state_dict(state)
    assert math.isfinite(dec.table()[0]["alpha"])
