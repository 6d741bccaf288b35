"""AlphaAdam / CautiousAdamW against independent float64 references and torch.optim.AdamW."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import pytest
import torch

from layerwise.optim import _cpu_kernel as CK
from layerwise.optim import _masked_kernels as K
from layerwise.optim.alphaadam import AlphaAdam, CautiousAdamW

SHAPES = [(24, 16), (16,), (7, 5, 3)]  # every tensor <= 4096 elements: one small compiled kernel


def make_params(seed: int = 0, shapes=SHAPES, dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def grads_for(step: int, params) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def lockstep(ref_opt, opt, a, b, steps: int, before_step=None, after_step=None) -> None:
    """``steps`` steps of two optimizers over twin parameter lists with the same gradients, then
    ``b == a`` to fp32 rounding.  ``before_step(step)`` runs first in every step (e.g. an LR schedule),
    ``after_step(step)`` last (e.g. a comparison of the diagnostics)."""
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        grads = grads_for(step, a)
        set_grads(a, grads)
        set_grads(b, grads)
        ref_opt.step()
        opt.step()
        if after_step is not None:
            after_step(step)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def reference_step(p, g, m, v, t, *, lr, betas, eps, wd, rule, alpha_mode="norm", alpha_max=10.0, floor=0.0):
    """Float64 reference of one update (written from the formulas, not from the library)."""
    p, g, m, v = (x.double() for x in (p, g, m, v))
    b1, b2 = betas
    m_new = b1 * m + (1 - b1) * g
    v_new = b2 * v + (1 - b2) * g * g
    u = (m_new / (1 - b1**t)) / ((v_new / (1 - b2**t)).sqrt() + eps)
    if rule == "none":
        mask = torch.ones_like(g, dtype=torch.bool)
    elif rule == "previous":
        mask = (m * g > 0) | (m == 0)
    elif rule == "current":
        mask = (m_new * g > 0) | (m_new == 0)
    elif rule == "cautious":
        mask = u * g > 0
    w = mask.double() + floor * (1 - mask.double())
    if rule == "none":
        alpha = 1.0
    elif alpha_mode == "norm":
        num, den = u.norm().item(), (w * u).norm().item()
        alpha = alpha_max if den == 0 else num / den
    else:
        alpha = 1.0 / max(w.mean().item(), 1.0 / alpha_max)
    alpha = min(max(alpha, 1.0), alpha_max)
    p_new = p * (1 - lr * wd) - lr * alpha * w * u
    return p_new, m_new, v_new, alpha, mask.double().mean().item()


def step_and_snapshot(opt, params, grads):
    """One step of ``opt`` with ``grads``; per parameter ``(p, g, (p, m, v) before the step, its diagnostics)``
    (``m = v = 0`` before a parameter's first step)."""

    def state(p, key):
        return opt.state[p][key].clone() if opt.state[p] else torch.zeros_like(p)

    before = [(p.detach().clone(), state(p, "exp_avg"), state(p, "exp_avg_sq")) for p in params]
    set_grads(params, grads)
    opt.step()
    diag = opt.diagnostics()
    return [(p, g, b, diag[f"group0.param{j}"]) for j, (p, g, b) in enumerate(zip(params, grads, before))]


def assert_state_close(opt, p, p_ref, m_ref, v_ref) -> None:
    """The parameter and both moments against float64 references, to fp32 rounding."""
    torch.testing.assert_close(p.double(), p_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), v_ref, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# masking=False is torch AdamW


@pytest.mark.parametrize("fast", [False, True])
def test_masking_false_matches_torch_adamw(fast):
    a, b = make_params(), make_params()
    groups_a = [{"params": a[:2], "weight_decay": 0.1}, {"params": a[2:], "weight_decay": 0.0}]
    groups_b = [{"params": b[:2], "weight_decay": 0.1}, {"params": b[2:], "weight_decay": 0.0}]
    ref = torch.optim.AdamW(groups_a, lr=3e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    opt = AlphaAdam(groups_b, lr=3e-2, betas=(0.9, 0.95), eps=1e-8, masking=False, fast=fast)

    def schedule(step):  # a new lr every step: no recompile per value
        for o in (ref, opt):
            for group in o.param_groups:
                group["lr"] = 3e-2 * (0.5 + 0.5 * math.cos(step / 25 * math.pi))

    lockstep(ref, opt, a, b, 25, schedule)
    for x, y in zip(a, b):
        torch.testing.assert_close(opt.state[y]["exp_avg"], ref.state[x]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[y]["exp_avg_sq"], ref.state[x]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert opt.state[y]["step"].dtype == torch.float32 and opt.state[y]["step"].item() == 25


# ---------------------------------------------------------------------------------------------
# the update against the float64 reference, one step at a time (eager path: all variants)


@pytest.mark.parametrize(
    "rule,alpha_mode,floor",
    [
        ("previous", "norm", 0.0),
        ("previous", "density", 0.0),
        ("current", "norm", 0.0),
        ("current", "density", 0.0),
        ("previous", "norm", 0.3),
        ("previous", "density", 0.3),
    ],
)
def test_alphaadam_matches_float64_reference(rule, alpha_mode, floor):
    params = make_params(1)
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, wd=0.05)
    opt = AlphaAdam(
        params,
        lr=kw["lr"],
        betas=kw["betas"],
        eps=kw["eps"],
        weight_decay=kw["wd"],
        mask_ref=rule,
        alpha_mode=alpha_mode,
        floor=floor,
        alpha_max=10.0,
        fast=False,
    )
    seen_alpha = []
    for step in range(1, 7):
        for p, g, (p0, m0, v0), d in step_and_snapshot(opt, params, grads_for(step, params)):
            p_ref, m_ref, v_ref, alpha, density = reference_step(
                p0, g, m0, v0, step, rule=rule, alpha_mode=alpha_mode, floor=floor, **kw
            )
            assert_state_close(opt, p, p_ref, m_ref, v_ref)
            assert d["alpha"] == pytest.approx(alpha, rel=1e-5)
            assert d["mask_density"] == pytest.approx(density, rel=1e-6)
            seen_alpha.append(alpha)
    assert max(seen_alpha) > 1.05  # the masks were not trivial


def test_cautious_matches_float64_reference():
    params = make_params(2)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.1)
    opt = CautiousAdamW(params, lr=kw["lr"], betas=kw["betas"], eps=kw["eps"], weight_decay=kw["wd"], fast=False)
    for step in range(1, 6):
        for p, g, (p0, m0, v0), d in step_and_snapshot(opt, params, grads_for(step, params)):
            p_ref, m_ref, v_ref, alpha, density = reference_step(
                p0, g, m0, v0, step, rule="cautious", alpha_mode="density", alpha_max=1000.0, **kw
            )
            assert_state_close(opt, p, p_ref, m_ref, v_ref)
            assert d["alpha"] == pytest.approx(1.0 / density, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# fast (compiled) == eager reference


def _count_paths(monkeypatch) -> dict[str, int]:
    """Count the tensors each path updates (spies that call the real functions)."""
    calls = {"c": 0, "compiled": 0, "eager": 0}
    real_c, real_many, real_eager = CK.steps_, K.update_many_, K.masked_adamw_

    def c(ps, *args):
        calls["c"] += len(ps)
        return real_c(ps, *args)

    def many(ps, *args, **kwargs):
        calls["compiled"] += len(ps)
        return real_many(ps, *args, **kwargs)

    def eager(*args, **kwargs):
        calls["eager"] += 1
        return real_eager(*args, **kwargs)

    monkeypatch.setattr(CK, "steps_", c)
    monkeypatch.setattr(K, "update_many_", many)
    monkeypatch.setattr(K, "masked_adamw_", eager)
    return calls


@pytest.mark.parametrize(
    "cpu_kernel",
    [False, pytest.param(True, marks=pytest.mark.skipif(CK.load() is None, reason=f"no C kernel: {CK.error()}"))],
    ids=["compiled", "c-kernel"],
)
@pytest.mark.parametrize("cls,kw", [(AlphaAdam, {}), (CautiousAdamW, {})], ids=["alphaadam", "cautious"])
def test_fast_matches_eager(cls, kw, cpu_kernel, monkeypatch):
    """Both fast paths (the compiled kernels; the C kernel) against the eager reference, each checked to
    be the path that actually ran."""
    a, b = make_params(3), make_params(3)
    eager = cls(a, lr=1e-2, weight_decay=0.1, fast=False, **kw)
    fast = cls(b, lr=1e-2, weight_decay=0.1, fast=True, cpu_kernel=cpu_kernel, **kw)
    calls = _count_paths(monkeypatch)
    lockstep(eager, fast, a, b, 8)
    n = 8 * len(SHAPES)
    # the eager optimizer's own steps are the only eager calls
    assert calls == ({"c": n, "compiled": 0, "eager": n} if cpu_kernel else {"c": 0, "compiled": n, "eager": n})
    de, df = eager.diagnostics(), fast.diagnostics()
    assert de.keys() == df.keys()
    for name in de:
        assert df[name]["alpha"] == pytest.approx(de[name]["alpha"], rel=1e-5)
        assert df[name]["mask_density"] == pytest.approx(de[name]["mask_density"], abs=1e-7)


def test_fast_buckets_match_eager(monkeypatch):
    """The compiled path batches tensors (same device, step count, dtypes and threading) into calls of
    up to ``K.BUCKET_SIZE``: mixed sizes (several equal), a bf16 tensor, one above the parallel
    threshold and a tensor one step behind (its grad was None once) must all match the eager path."""
    shapes = [(5, 3), (15,), (7, 2), (4, 4), (16,), (3, 5), (9,), (2, 2, 2), (6,), (11,)]
    a, b = make_params(5, shapes), make_params(5, shapes)
    for ps in (a, b):
        ps.append(torch.nn.Parameter(torch.randn(12, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)))
        ps.append(torch.nn.Parameter(torch.randn(K.PARALLEL_MIN_NUMEL + 5, generator=torch.Generator().manual_seed(8))))
    names = [f"p{i}" for i in range(len(a))]
    eager = AlphaAdam([{"params": a, "param_names": names}], lr=1e-2, weight_decay=0.1, fast=False)
    fast = AlphaAdam([{"params": b, "param_names": names}], lr=1e-2, weight_decay=0.1, fast=True, cpu_kernel=False)
    lengths = []
    real = K.update_many_

    def spy(ps, *args, **kwargs):
        lengths.append(len(ps))
        return real(ps, *args, **kwargs)

    monkeypatch.setattr(K, "update_many_", spy)
    for step in range(3):
        grads = grads_for(step, a)
        set_grads(a, grads)
        set_grads(b, grads)
        if step == 0:
            a[3].grad = b[3].grad = None  # p3 lags one step: its own bucket afterwards
        eager.step()
        fast.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    assert fast.state[b[3]]["step"].item() == 2.0
    de, df = eager.diagnostics(), fast.diagnostics()
    assert list(df) == names
    for name in de:
        assert df[name]["alpha"] == pytest.approx(de[name]["alpha"], rel=1e-5)
        assert df[name]["mask_density"] == de[name]["mask_density"]
    # step 0: 9 fp32 serial tensors -> 8 + 1, bf16 1, parallel 1; later steps: the same plus p3 alone
    assert lengths[:4] == [K.BUCKET_SIZE, 1, 1, 1]
    assert sorted(lengths[4:9], reverse=True) == [K.BUCKET_SIZE, 1, 1, 1, 1]
    assert sum(lengths) == 11 + 2 * 12 and max(lengths) == K.BUCKET_SIZE


def test_fast_bucket_lengths_are_powers_of_two(monkeypatch):
    """Leftover buckets are split into power-of-two lengths (bounded number of compilations); a
    one-element parameter (e.g. a scalar multiplier) gets a bucket of its own kind."""
    shapes = [(3,)] * 7 + [(1,)]
    a, b = make_params(6, shapes), make_params(6, shapes)
    lengths = []
    real = K.update_many_

    def spy(ps, *args, **kwargs):
        lengths.append(tuple(p.numel() for p in ps))
        return real(ps, *args, **kwargs)

    monkeypatch.setattr(K, "update_many_", spy)
    eager, fast = CautiousAdamW(a, lr=1e-2, fast=False), CautiousAdamW(b, lr=1e-2, fast=True, cpu_kernel=False)
    lockstep(eager, fast, a, b, 2)
    assert lengths[:4] == [(3,) * 4, (3,) * 2, (3,), (1,)]


# ---------------------------------------------------------------------------------------------
# mask semantics


def test_masked_coordinates_move_only_by_weight_decay():
    (p,) = make_params(4, shapes=[(40, 30)])
    lr, wd = 1e-2, 0.1
    opt = AlphaAdam([p], lr=lr, weight_decay=wd, fast=False)
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(0))
    opt.step()
    m_prev = opt.state[p]["exp_avg"].clone()
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    masked = m_prev * p.grad <= 0
    assert 0.3 < masked.float().mean().item() < 0.7
    p_before = p.detach().clone()
    opt.step()
    decay = torch.tensor(1 - lr * wd, dtype=torch.float32)
    assert torch.equal(p.detach()[masked], p_before[masked] * decay)
    assert not torch.allclose(p.detach()[~masked], p_before[~masked] * decay)
    # the moments are dense: both moments equal the unmasked Adam moments everywhere
    g = p.grad
    torch.testing.assert_close(opt.state[p]["exp_avg"], m_prev + 0.1 * (g - m_prev))


def test_fully_masked_tensor_only_decays_and_alpha_is_capped():
    (p,) = make_params(5, shapes=[(10, 10)])
    opt = AlphaAdam([p], lr=1e-2, weight_decay=0.2, alpha_max=4.0, fast=False)
    p.grad = torch.randn(p.shape)
    opt.step()
    p.grad = -opt.state[p]["exp_avg"].sign()  # disagrees with m_{t-1} everywhere
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before * torch.tensor(1 - 1e-2 * 0.2))
    d = opt.diagnostics()["group0.param0"]
    assert d["mask_density"] == 0.0 and d["alpha"] == 4.0


@pytest.mark.parametrize("alpha_mode", ["norm", "density"])
def test_alpha_within_bounds_and_clamped(alpha_mode):
    params = make_params(6)
    opt = AlphaAdam(params, lr=1e-2, alpha_mode=alpha_mode, alpha_max=1.2, fast=False)
    alphas = []
    for step in range(6):
        set_grads(params, grads_for(step, params))
        opt.step()
        alphas += [d["alpha"] for d in opt.diagnostics().values()]
    cap = float(torch.tensor(1.2, dtype=torch.float32))  # alpha is an fp32 value
    assert all(1.0 <= a <= cap for a in alphas)
    assert min(alphas) == 1.0  # first step: no mask
    assert max(alphas) == cap  # ~50% agreement: uncapped alpha ~1.4-2, the cap binds


@pytest.mark.parametrize("mask_ref", ["previous", "current"])
def test_first_step_is_adamw(mask_ref):
    a, b = make_params(7), make_params(7)
    ref = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1)
    opt = AlphaAdam(b, lr=1e-2, weight_decay=0.1, mask_ref=mask_ref, fast=False)
    grads = grads_for(0, a)
    grads[0][0] = 0.0  # zero gradients: m_1 == 0 there, still mask 1
    set_grads(a, grads)
    set_grads(b, grads)
    ref.step()
    opt.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
    assert all(d == {"alpha": 1.0, "mask_density": 1.0} for d in opt.diagnostics().values())


def test_norm_alpha_preserves_update_norm():
    (p,) = make_params(8, shapes=[(30, 20)])
    opt = AlphaAdam([p], lr=1e-2, weight_decay=0.0, alpha_max=100.0, fast=False)
    for step in range(3):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        m, v = (
            (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
            if opt.state[p]
            else (torch.zeros_like(p), torch.zeros_like(p))
        )
        before = p.detach().clone()
        opt.step()
        unmasked = reference_step(
            before, p.grad, m, v, step + 1, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.0, rule="none"
        )[0]
        assert (p.detach() - before).norm().item() == pytest.approx(
            (unmasked - before.double()).norm().item(), rel=1e-4
        )


# ---------------------------------------------------------------------------------------------
# state dicts


def _run(opt, params, steps, start):
    for step in range(start, start + steps):
        set_grads(params, grads_for(step, params))
        opt.step()


def test_state_dict_round_trip():
    a = make_params(9)
    opt = AlphaAdam(a, lr=1e-2, alpha_mode="density", fast=False)
    _run(opt, a, 4, 0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt2 = AlphaAdam(b, lr=1.0, fast=False)  # hyper-parameters come from the state dict
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["alpha_mode"] == "density" and opt2.param_groups[0]["lr"] == 1e-2
    sd = opt.state_dict()["state"][0]
    assert set(sd) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["step"].dtype == torch.float32 and sd["step"].dim() == 0
    _run(opt, a, 3, 4)
    _run(opt2, b, 3, 4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_adamw_state_loads_into_alphaadam_and_back():
    a = make_params(10)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ref = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1)
    _run(ref, a, 3, 0)
    for x, y in zip(a, b):
        y.data.copy_(x.data)
    opt = AlphaAdam(b, lr=1e-2, weight_decay=0.1, masking=False, fast=False)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert opt.param_groups[0]["masking"] is False and opt.param_groups[0]["mask_ref"] == "previous"
    _run(ref, a, 3, 3)
    _run(opt, b, 3, 3)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    # and back: AlphaAdam's state dict drives a torch AdamW
    back = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    back.load_state_dict(opt.state_dict())
    _run(back, b, 1, 6)
    assert back.state[b[0]]["step"].item() == 7


# ---------------------------------------------------------------------------------------------
# dtypes, grads, names, errors


def test_bf16_params_use_fp32_math():
    a = make_params(11, dtype=torch.float32)
    b = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in a]
    for p in a:
        p.data.copy_(p.data.to(torch.bfloat16).float())  # same starting values
    grads = [g.to(torch.bfloat16) for g in grads_for(0, a)]
    set_grads(a, [g.float() for g in grads])
    set_grads(b, grads)
    AlphaAdam(a, lr=1e-2, fast=False).step()
    opt = AlphaAdam(b, lr=1e-2, fast=False)
    opt.step()
    for x, y in zip(a, b):
        assert y.dtype == torch.bfloat16 and opt.state[y]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(y, x.to(torch.bfloat16))  # fp32 result, rounded once


def test_params_without_grad_are_skipped_and_names_used():
    a = make_params(12)
    opt = AlphaAdam([{"params": a, "param_names": ["w", "b", "c"], "group": "matrix", "lr_scale": 2.0}], fast=False)
    a[0].grad = torch.ones_like(a[0])
    before = a[1].detach().clone()
    opt.step()
    assert torch.equal(a[1], before) and len(opt.state[a[1]]) == 0
    assert set(opt.diagnostics()) == {"w"}
    opt2 = AlphaAdam(a[:2], fast=False)
    a[1].grad = torch.ones_like(a[1])
    opt2.step()
    assert set(opt2.diagnostics()) == {"group0.param0", "group0.param1"}


def test_non_contiguous_param_takes_eager_path(monkeypatch):
    a = torch.nn.Parameter(torch.randn(8, 6).t())
    b = torch.nn.Parameter(a.detach().contiguous())
    assert not a.is_contiguous()
    g = torch.randn(6, 8)
    a.grad, b.grad = g.clone(), g.clone()
    calls = _count_paths(monkeypatch)
    AlphaAdam([a], lr=1e-2, fast=True).step()
    assert calls == {"c": 0, "compiled": 0, "eager": 1}
    AlphaAdam([b], lr=1e-2, fast=False).step()
    torch.testing.assert_close(a.detach(), b.detach())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), "betas[0]"),
        (dict(betas=(0.9, -0.1)), "betas[1]"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(alpha_max=0.5), "alpha_max"),
        (dict(alpha_max=math.inf), "alpha_max"),
        (dict(floor=1.5), "floor"),
        (dict(floor=-0.1), "floor"),
        (dict(mask_ref="next"), "mask_ref"),
        (dict(alpha_mode="max"), "alpha_mode"),
        (dict(masking="yes"), "masking"),
        (dict(fast="auto"), "fast"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_invalid_hyperparameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=r"\b" + re.escape(field) + "="):
        AlphaAdam(make_params(), **kwargs)


def test_invalid_group_value_names_group():
    a = make_params()
    with pytest.raises(ValueError, match=r"floor=2.*param group 1"):
        AlphaAdam([{"params": a[:1]}, {"params": a[1:], "floor": 2}])
    with pytest.raises(ValueError, match="weight_decay"):
        CautiousAdamW(a, weight_decay=-1)


def test_sparse_grad_raises_naming_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.ones(3))
    dense.grad = torch.ones(3)
    opt = AlphaAdam([{"params": [dense, emb.weight], "param_names": ["d", "embed_tokens.weight"]}], fast=False)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse.*embed_tokens.weight"):
        opt.step()
    assert torch.equal(dense, torch.ones(3)) and len(opt.state[dense]) == 0  # no half step


def test_scratch_buffer_is_one_fp32_tensor_of_the_largest_masked_param():
    a = make_params(14)
    a[0] = torch.nn.Parameter(a[0].detach().to(torch.bfloat16))
    opt = AlphaAdam([{"params": a[:1]}, {"params": a[1:], "masking": False}], fast=False)
    set_grads(a, grads_for(0, a))
    opt.step()
    (buf,) = opt._scratch.values()
    assert buf.dtype == torch.float32 and buf.numel() == a[0].numel()
    assert "scratch" not in str(opt.state_dict().keys())


def _fresh_compiled(monkeypatch, backend) -> None:
    monkeypatch.setattr(K, "_COMPILED", {})
    monkeypatch.setattr(K, "_BROKEN", set())
    monkeypatch.setattr(K, "_WARNED", False)
    monkeypatch.setattr(K, "_BACKEND", backend)


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    """A backend that fails while compiling (as inductor does without a C++ compiler): dynamo raises
    before the graph runs; the optimizer warns once and the eager path gives the same result."""

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    _fresh_compiled(monkeypatch, broken)
    a, b = make_params(13), make_params(13)
    fast, eager = AlphaAdam(a, lr=1e-2, fast=None, cpu_kernel=False), AlphaAdam(b, lr=1e-2, fast=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            g = grads_for(step, a)
            set_grads(a, g)
            set_grads(b, g)
            fast.step()
            eager.step()
    assert len([w for w in caught if "falling back to the eager path" in str(w.message)]) == 1
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    _fresh_compiled(monkeypatch, broken)
    strict = AlphaAdam(a, fast=True, cpu_kernel=False)
    set_grads(a, grads_for(0, a))
    with pytest.raises(Exception, match="no compiler here"):
        strict.step()


def test_run_time_error_after_a_partial_write_is_not_reapplied(monkeypatch):
    """A compiled kernel that writes its outputs and then fails at run time: the error propagates and the
    update is not run a second time by the eager fallback (it would apply the step twice)."""

    def writes_then_fails(gm, example_inputs):
        def run(*args):
            gm(*args)  # the whole update is written ...
            raise RuntimeError("kernel failed after writing")  # ... then the run fails

        return run

    _fresh_compiled(monkeypatch, writes_then_fails)
    a, b = make_params(21, SHAPES[:2]), make_params(21, SHAPES[:2])  # one compiled call of two tensors
    fast = AlphaAdam(a, lr=1e-2, weight_decay=0.1, fast=None, cpu_kernel=False)
    once = AlphaAdam(b, lr=1e-2, weight_decay=0.1, fast=False)
    g = grads_for(0, a)
    set_grads(a, g)
    set_grads(b, g)
    with pytest.raises(RuntimeError, match="kernel failed after writing"):
        fast.step()
    once.step()
    for x, y in zip(a, b):  # exactly one update, not two
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert not K._BROKEN and not K._WARNED
