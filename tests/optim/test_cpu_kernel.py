"""The C++ kernel of the masked update (layerwise.optim._cpu_kernel) against the one definition of the
rule (layerwise.optim._masked_rule) and the eager reference path built from it."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from layerwise.optim import _cpu_kernel as CK
from layerwise.optim import _masked_kernels as K
from layerwise.optim import _masked_rule as R
from layerwise.optim.alphaadam import AlphaAdam, CautiousAdamW

needs_c = pytest.mark.skipif(CK.load() is None, reason=f"C kernel unavailable: {CK.error()}")


def _h(t: int = 3, floor: float = 0.0, alpha_max: float = 10.0) -> torch.Tensor:
    lr, wd, b1, b2, eps = 1e-3, 0.1, 0.9, 0.95, 1e-8
    return torch.tensor(
        [1 - lr * wd, 1 - b1, b2, 1 - b2, eps, lr / (1 - b1**t), (1 - b2**t) ** 0.5, alpha_max, floor],
        dtype=torch.float32,
    )


@needs_c
@pytest.mark.parametrize(
    "rule,mode,floor",
    [
        ("previous", "norm", 0.0),
        ("previous", "density", 0.0),
        ("current", "norm", 0.25),
        ("current", "density", 0.5),
        ("cautious", "density", 0.0),
        ("previous", "norm", 1.0),
    ],
)
@pytest.mark.parametrize("n,threads", [(1, 1), (7, 1), (1029, 1), (CK.PARALLEL_MIN_NUMEL + 333, 2)])
def test_kernel_equals_eager_reference(rule, mode, floor, n, threads):
    """Sizes off every vector/block/chunk boundary; zeros in m (mask = 1 there, first-step rule);
    the multi-threaded split of a large tensor adds partial sums in chunk order."""
    gen = torch.Generator().manual_seed(n)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 1e-2
    m[::5] = 0.0
    h = _h(floor=floor)
    ref_p, ref_m, ref_v = p.clone(), m.clone(), v.clone()
    alpha_ref, dens_ref = K.masked_adamw_(ref_p, g, ref_m, ref_v, h, rule, mode)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.full((2,), float("nan"))
        CK.step_(p, g, m, v, torch.empty(n), h, rule, mode, out)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(m, ref_m, rtol=0, atol=0)  # moments: the same float ops in the same order
    torch.testing.assert_close(v, ref_v, rtol=0, atol=0)
    torch.testing.assert_close(out[0], alpha_ref, rtol=2e-6, atol=0)  # sums in another order
    torch.testing.assert_close(out[1], dens_ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=1e-7)
    assert 1.0 <= float(out[0]) <= 10.0


@needs_c
@pytest.mark.parametrize("mode", ["norm", "density"])
@pytest.mark.parametrize(
    "sums,n,floor,alpha_max",
    [
        ((4.0, 1.0, 30.0, None), 100, 0.0, 10.0),  # norm: sqrt(4 / 1) = 2; density 0.3 -> 1 / 0.3
        ((4.0, 0.0, 0.0, None), 100, 0.0, 10.0),  # nothing kept: norm alpha hits alpha_max, density 0
        ((1.0, 4.0, 100.0, None), 100, 0.0, 10.0),  # alpha below 1 is clamped to 1
        ((9.0, 1.0, 5.0, None), 100, 0.5, 2.5),  # floor 0.5: mean(w) = 0.05 + 0.5 * 0.95; alpha_max 2.5
        ((1e6, 1.0, 1.0, None), 1000, 0.0, 1000.0),  # density floor 1 / alpha_max
    ],
)
def test_kernel_alpha_equals_alpha_from_sums(mode, sums, n, floor, alpha_max):
    """The kernel's scalar ``alpha``/density step (native code, so a second copy of the formula) against
    ``_masked_rule.alpha_from_sums`` on hand-picked sums, edge cases included."""
    h = _h(floor=floor, alpha_max=alpha_max)
    uu, ww, cnt, _ = sums
    out = torch.full((2,), float("nan"))
    CK.load().alpha_from_sums_(torch.tensor([uu, ww, cnt], dtype=torch.float64), n, h, CK.MODE_CODES[mode], out)
    alpha, density = R.alpha_from_sums(torch.tensor([uu, ww, cnt, float(n)]), h, mode)
    torch.testing.assert_close(out[1], density, rtol=1e-7, atol=0)
    torch.testing.assert_close(out[0], alpha, rtol=1e-6, atol=0)
    # and by hand, independently of both
    d = cnt / n
    expect = (
        (uu / ww) ** 0.5
        if (mode == "norm" and ww > 0)
        else (alpha_max if mode == "norm" else 1.0 / max(d + floor * (1 - d), 1.0 / alpha_max))
    )
    assert float(out[0]) == pytest.approx(min(max(expect, 1.0), alpha_max), rel=1e-6)


@needs_c
@pytest.mark.parametrize("rule,mode", [("previous", "norm"), ("cautious", "density"), ("none", "norm")])
def test_batched_call_equals_one_call_per_tensor(rule, mode):
    """steps_ (several tensors, one scratch, one call) gives exactly what step_ gives tensor by tensor."""
    gen = torch.Generator().manual_seed(7)
    sizes = [5, 1029, 64, 300]
    make = lambda: [torch.randn(n, generator=gen) for n in sizes]
    ps, gs, ms = make(), make(), make()
    vs = [torch.rand(n, generator=gen) * 1e-2 for n in sizes]
    h = _h(floor=0.25)
    ref = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    ref_out = torch.full((len(sizes), 2), float("nan"))
    for i in range(len(sizes)):
        CK.step_(ref[0][i], gs[i], ref[1][i], ref[2][i], torch.empty(sizes[i]), h, rule, mode, ref_out[i])
    out = torch.full((len(sizes), 2), float("nan"))
    CK.steps_(ps, gs, ms, vs, torch.empty(max(sizes)), h, rule, mode, None if rule == "none" else out)
    for got, want in zip(ps + ms + vs, ref[0] + ref[1] + ref[2]):
        assert torch.equal(got, want)
    if rule != "none":
        assert torch.equal(out, ref_out)
    with pytest.raises(RuntimeError, match="scratch"):
        CK.steps_(ps, gs, ms, vs, torch.empty(10), h, "previous", "norm", out)  # scratch too small


@needs_c
def test_plain_adamw_kernel_equals_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3000, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AlphaAdam([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, masking=False, cpu_kernel=True)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for _step in range(20):
        g = torch.randn(3000, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@needs_c
@pytest.mark.parametrize("cls", [AlphaAdam, CautiousAdamW])
def test_optimizer_c_path_equals_eager_with_mixed_tensors(cls, monkeypatch):
    """In one optimizer, fp32 tensors take the C kernel and a bf16 tensor the compiled path; a tensor
    without a gradient is skipped.  (Single-path agreement, diagnostics included: test_fast_matches_eager.)"""

    def params():
        gen = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(33, 17), (64,), (5, 5)]] + [
            torch.nn.Parameter(torch.randn(9, generator=gen).to(torch.bfloat16))
        ]

    a, b = params(), params()
    fast, eager = cls(a, lr=1e-2, weight_decay=0.1, cpu_kernel=True), cls(b, lr=1e-2, weight_decay=0.1, fast=False)
    calls = {"c": 0, "compiled": 0}
    real_c, real_many = CK.steps_, K.update_many_

    def spy_c(ps, *args):
        calls["c"] += len(ps)
        assert all(p.dtype == torch.float32 for p in ps)
        return real_c(ps, *args)

    def spy_many(ps, *args, **kwargs):
        calls["compiled"] += len(ps)
        assert all(p.dtype == torch.bfloat16 for p in ps)
        return real_many(ps, *args, **kwargs)

    monkeypatch.setattr(CK, "steps_", spy_c)
    monkeypatch.setattr(K, "update_many_", spy_many)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(x.dtype)
            x.grad, y.grad = g.clone(), g.clone()
        a[2].grad = b[2].grad = None if step == 1 else a[2].grad
        fast.step()
        eager.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert fast.diagnostics().keys() == eager.diagnostics().keys()
    assert calls == {"c": 3 * 4 - 1, "compiled": 4}  # three fp32 tensors (one skipped once), one bf16


def test_unbuildable_kernel_falls_back_or_raises(monkeypatch, tmp_path):
    """No C++ compiler: load() returns None with the reason; cpu_kernel=True says why it cannot;
    cpu_kernel=None warns once (naming the reason) and steps through the compiled path, equal to eager."""
    monkeypatch.setattr(CK, "_OPS", None)
    monkeypatch.setattr(CK, "_TRIED", False)
    monkeypatch.setattr(CK, "_ERROR", None)
    monkeypatch.setattr(CK, "_WARNED", False)
    monkeypatch.setattr(CK, "_registered", lambda: False)  # as in a process that never built it
    monkeypatch.setenv("LAYERWISE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert CK.load() is None and "no C++ compiler" in CK.error() and "no-such-c++" in CK.error()
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(RuntimeError, match="C kernel is unavailable.*no C\\+\\+ compiler"):
        AlphaAdam([p], cpu_kernel=True)
    q = torch.nn.Parameter(torch.ones(4))
    opt, ref = AlphaAdam([p], lr=0.1), AlphaAdam([q], lr=0.1, fast=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            p.grad, q.grad = torch.ones(4), torch.ones(4)
            opt.step()
            ref.step()
    said = [str(w.message) for w in caught if "C++ kernel" in str(w.message)]
    assert len(said) == 1 and "no C++ compiler" in said[0]
    torch.testing.assert_close(p.detach(), q.detach())
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
    with pytest.raises(ValueError, match="cpu_kernel"):
        AlphaAdam([p], cpu_kernel="yes")
    with pytest.raises(ValueError, match="needs the fast path"):
        AlphaAdam([p], cpu_kernel=True, fast=False)


def test_disabled_kernel_is_not_built_and_does_not_warn(monkeypatch):
    monkeypatch.setattr(CK, "_OPS", None)
    monkeypatch.setattr(CK, "_TRIED", False)
    monkeypatch.setattr(CK, "_ERROR", None)
    monkeypatch.setattr(CK, "_WARNED", False)
    monkeypatch.setenv("LAYERWISE_NO_CKERNEL", "1")
    monkeypatch.setattr(CK, "_build", lambda: pytest.fail("built although disabled"))
    assert CK.load() is None and "LAYERWISE_NO_CKERNEL" in CK.error()
    p = torch.nn.Parameter(torch.ones(4))
    opt = AlphaAdam([p], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.grad = torch.ones(4)
        opt.step()


@needs_c
def test_kernel_is_built_once_into_its_cache():
    """The build lives under $LAYERWISE_KERNEL_CACHE/<key>; a second process loads it without compiling
    again (the library file is not rewritten)."""
    build = CK.build_dir_()
    (lib,) = build.glob("*.so")
    mtime = lib.stat().st_mtime_ns
    code = (
        "from layerwise.optim import _cpu_kernel as CK; import sys; "
        "sys.exit(0 if CK.load() is not None else CK.error())"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    assert lib.stat().st_mtime_ns == mtime
