"""``alpha_lag=1`` (AlphaAdam / CautiousAdamW): alpha from the previous step's statistics, one pass per tensor.

Every path (eager, compiled, C kernel; the sharded one in tests/distributed/test_alphaadam_sharded.py) against
a float64 reference written from the formulas and against the eager path; resume == uninterrupted."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from test_alphaadam import (
    SHAPES,
    _run,
    assert_state_close,
    grads_for,
    lockstep,
    make_params,
    reference_step,
    step_and_snapshot,
)

from layerwise.optim import _cpu_kernel as CK
from layerwise.optim import _masked_kernels as K
from layerwise.optim import _masked_rule as R
from layerwise.optim.alphaadam import AlphaAdam, CautiousAdamW

needs_c = pytest.mark.skipif(CK.load() is None, reason=f"C kernel unavailable: {CK.error()}")


VARIANTS = [
    (AlphaAdam, dict(mask_ref="previous", alpha_mode="norm")),
    (AlphaAdam, dict(mask_ref="current", alpha_mode="density")),
    (AlphaAdam, dict(mask_ref="previous", alpha_mode="norm", floor=0.3)),
    (CautiousAdamW, {}),
]
IDS = ["previous-norm", "current-density", "previous-norm-floor", "cautious"]


def _rule_of(cls, kw):
    if cls is CautiousAdamW:
        return dict(rule="cautious", alpha_mode="density", alpha_max=1000.0, floor=0.0)
    return dict(rule=kw["mask_ref"], alpha_mode=kw["alpha_mode"], alpha_max=10.0, floor=kw.get("floor", 0.0))


@pytest.mark.parametrize("cls,kw", VARIANTS, ids=IDS)
def test_lagged_equals_float64_reference(cls, kw):
    """alpha applied at step t = the exact rule's alpha of step t - 1 (of step 1 at step 1); the mask, the
    moments and the density are this step's.  Starts from AdamW-like state with m != 0 (the first step's mask
    is not trivial), so the first step's exact alpha is > 1."""
    params = make_params(1)
    hp = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, wd=0.05)
    opt = cls(
        params, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"], alpha_lag=1, fast=False, **kw
    )
    gen = torch.Generator().manual_seed(9)
    for p in params:  # state as if loaded from an AdamW run: no alpha_sums yet
        opt.state[p].update(
            step=torch.tensor(0.0),
            exp_avg=torch.randn(p.shape, generator=gen) * 0.1,
            exp_avg_sq=torch.rand(p.shape, generator=gen) * 0.1,
        )
    rule = _rule_of(cls, kw)
    decay = 1 - hp["lr"] * hp["wd"]
    prev_alpha: list[float | None] = [None] * len(params)
    applied = []
    for step in range(1, 7):
        for j, (p, g, (p0, m0, v0), d) in enumerate(step_and_snapshot(opt, params, grads_for(step, params))):
            # the exact rule's step is p_exact = decay p - lr alpha_now (w u): the lagged one scales its update
            p_exact, m_ref, v_ref, alpha_now, density = reference_step(p0, g, m0, v0, step, **hp, **rule)
            alpha = alpha_now if prev_alpha[j] is None else prev_alpha[j]
            p_ref = decay * p0.double() + (alpha / alpha_now) * (p_exact - decay * p0.double())
            assert_state_close(opt, p, p_ref, m_ref, v_ref)
            assert d["alpha"] == pytest.approx(alpha, rel=1e-5)
            assert d["mask_density"] == pytest.approx(density, abs=1e-6)
            assert opt.state[p]["alpha_sums"].dtype == torch.float32
            prev_alpha[j] = alpha_now
            applied.append((alpha, alpha_now))
    assert applied[0][0] > 1.05  # the first step's exact alpha was applied, not 1
    assert sum(abs(a - b) > 1e-3 for a, b in applied) >= len(applied) // 2  # the lag changed most steps' alpha


def _count_paths(monkeypatch):
    calls = {"c": 0, "compiled": 0}
    real_c, real_many = CK.steps_, K.update_many_

    def c(ps, *args):
        assert args[-2] is not None  # the lagged kernel: with sums
        calls["c"] += len(ps)
        return real_c(ps, *args)

    def many(ps, *args, **kwargs):
        assert kwargs.get("lag") in ("first", "lagged")
        calls["compiled"] += len(ps)
        return real_many(ps, *args, **kwargs)

    monkeypatch.setattr(CK, "steps_", c)
    monkeypatch.setattr(K, "update_many_", many)
    return calls


@pytest.mark.parametrize(
    "cpu_kernel",
    [False, pytest.param(True, marks=needs_c)],
    ids=["compiled", "c-kernel"],
)
@pytest.mark.parametrize("cls,kw", VARIANTS[:1] + VARIANTS[3:], ids=["alphaadam", "cautious"])
def test_fast_paths_equal_eager(cls, kw, cpu_kernel, monkeypatch):
    """The compiled kernels and the C kernel (one pass after the first step) against the eager reference:
    parameters, moments, the stored sums and the diagnostics, each checked to be the path that ran."""
    a, b = make_params(3), make_params(3)
    eager = cls(a, lr=1e-2, weight_decay=0.1, alpha_lag=1, fast=False, **kw)
    fast = cls(b, lr=1e-2, weight_decay=0.1, alpha_lag=1, fast=True, cpu_kernel=cpu_kernel, **kw)
    calls = _count_paths(monkeypatch)

    def same_diagnostics(_step):
        de, df = eager.diagnostics(), fast.diagnostics()
        assert de.keys() == df.keys()
        for name in de:
            assert df[name]["alpha"] == pytest.approx(de[name]["alpha"], rel=1e-5)
            assert df[name]["mask_density"] == pytest.approx(de[name]["mask_density"], abs=1e-7)

    lockstep(eager, fast, a, b, 6, after_step=same_diagnostics)
    for x, y in zip(a, b):
        torch.testing.assert_close(fast.state[y]["exp_avg"], eager.state[x]["exp_avg"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(fast.state[y]["alpha_sums"], eager.state[x]["alpha_sums"], rtol=1e-5, atol=0)
    n = 6 * len(SHAPES)
    assert calls == ({"c": n, "compiled": 0} if cpu_kernel else {"c": 0, "compiled": n})


@needs_c
@pytest.mark.parametrize(
    "rule,mode,floor", [("previous", "norm", 0.0), ("current", "density", 0.5), ("cautious", "density", 0.0)]
)
@pytest.mark.parametrize("n,threads", [(1, 1), (1029, 1), (CK.PARALLEL_MIN_NUMEL + 333, 2)])
def test_c_kernel_lagged_step_equals_masked_lagged(rule, mode, floor, n, threads):
    """One C call (first: the exact two passes; then one pass with alpha from the stored sums) against
    ``_masked_kernels.masked_lagged_`` (the eager definition): identical moments, the same alpha from the
    same sums, parameters and sums to rounding (sums added in another order)."""
    gen = torch.Generator().manual_seed(n)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 1e-2
    m[::5] = 0.0
    h = R.hyper(1e-3, (0.9, 0.95), 1e-8, 0.1, 3, 10.0, floor)
    ref = [p.clone(), m.clone(), v.clone()]
    ref_sums = None
    sums = torch.zeros(4)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for first in (True, False, False):
            g = torch.randn(n, generator=gen)
            prev = None if ref_sums is None else sums.clone()  # the same previous sums for both
            a_ref, d_ref, ref_sums = K.masked_lagged_(ref[0], g, ref[1], ref[2], h, prev, rule, mode)
            out = torch.full((1, 2), float("nan"))
            CK.steps_([p], [g], [m], [v], torch.empty(n), h, rule, mode, out, [sums], first)
            assert torch.equal(m, ref[1]) and torch.equal(v, ref[2])
            if first:
                torch.testing.assert_close(out[0, 0], a_ref, rtol=2e-6, atol=0)
            else:
                # alpha from the same stored sums: to one rounding (torch divides a 0-d tensor by multiplying
                # with its reciprocal, the kernel divides)
                torch.testing.assert_close(out[0, 0], a_ref, rtol=1.2e-7, atol=0)
            torch.testing.assert_close(out[0, 1], d_ref, rtol=0, atol=1e-7)
            torch.testing.assert_close(sums, ref_sums, rtol=2e-5, atol=0)
            torch.testing.assert_close(p, ref[0], rtol=1e-6, atol=1e-7)
            sums.copy_(ref_sums)  # the next step starts from identical sums
            p.copy_(ref[0])
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize(
    "dtype,fast",
    [(torch.float32, None), (torch.bfloat16, False)],
    ids=["fp32-default-path", "bf16-eager"],
)
def test_resume_equals_uninterrupted(dtype, fast):
    """State dict through torch.save / torch.load into a new optimizer: the continued run is bitwise the
    uninterrupted one.  The sums stay fp32 for bf16 parameters (torch would cast them to bf16)."""
    a = make_params(9, dtype=dtype)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = AlphaAdam(a, lr=1e-2, alpha_lag=1, fast=fast)
    opt_b = AlphaAdam(b, lr=1e-2, alpha_lag=1, fast=fast)
    _run(opt_a, a, 3, 0)
    _run(opt_b, b, 3, 0)
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq", "alpha_sums"} for s in sd["state"].values())
    opt_c = AlphaAdam(b, lr=1.0, fast=fast)  # hyper-parameters, alpha_lag included, come from the state dict
    opt_c.load_state_dict(sd)
    assert opt_c.param_groups[0]["alpha_lag"] == 1
    for p in b:
        assert opt_c.state[p]["alpha_sums"].dtype == torch.float32
        assert torch.equal(opt_c.state[p]["alpha_sums"], opt_b.state[p]["alpha_sums"])
    _run(opt_a, a, 3, 3)
    _run(opt_c, b, 3, 3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_first_lagged_step_is_exact_and_lag0_keeps_adamw_state():
    """From AdamW state (m != 0), the first alpha_lag=1 step equals the exact rule's; alpha_lag=0 keeps torch
    AdamW's state keys, and switching a group back to 0 drops the sums."""
    a, b = make_params(4), make_params(4)
    ref = torch.optim.AdamW(a, lr=1e-2)
    _run(ref, a, 2, 0)
    for x, y in zip(a, b):
        y.data.copy_(x.data)
    exact, lagged = AlphaAdam(a, lr=1e-2, fast=False), AlphaAdam(b, lr=1e-2, alpha_lag=1, fast=False)
    exact.load_state_dict(copy.deepcopy(ref.state_dict()))  # copies: loading does not copy the moments
    lagged.load_state_dict(copy.deepcopy(ref.state_dict()))
    _run(exact, a, 1, 2)
    _run(lagged, b, 1, 2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert exact.diagnostics() == lagged.diagnostics()
    assert max(d["alpha"] for d in exact.diagnostics().values()) > 1.05
    assert all(set(exact.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in a)
    lagged.param_groups[0]["alpha_lag"] = 0
    _run(lagged, b, 1, 3)
    assert all("alpha_sums" not in lagged.state[p] for p in b)


@pytest.mark.parametrize("bad", [2, -1, True, "1", 0.5])
@pytest.mark.parametrize("cls", [AlphaAdam, CautiousAdamW])
def test_invalid_alpha_lag_names_the_field(cls, bad):
    with pytest.raises(ValueError, match=re.escape(f"alpha_lag={bad!r}")):
        cls(make_params(), alpha_lag=bad)
