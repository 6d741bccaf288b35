"""The C kernel of the masked update (layerwise.optim._cpu_kernel) against the eager reference path."""
from __future__ import annotations

import pytest
import torch

from layerwise.optim import _cpu_kernel as CK
from layerwise.optim import _masked_kernels as K
from layerwise.optim.alphaadam import AlphaAdam, CautiousAdamW

needs_c = pytest.mark.skipif(CK.load() is None, reason=f"C kernel unavailable: {CK.error()}")


def _h(t: int = 3, floor: float = 0.0, alpha_max: float = 10.0) -> torch.Tensor:
    lr, wd, b1, b2, eps = 1e-3, 0.1, 0.9, 0.95, 1e-8
    return torch.tensor([1 - lr * wd, 1 - b1, b2, 1 - b2, eps, lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5,
                         alpha_max, floor], dtype=torch.float32)


@needs_c
@pytest.mark.parametrize("rule,mode,floor", [("previous", "norm", 0.0), ("previous", "density", 0.0),
                                             ("current", "norm", 0.25), ("current", "density", 0.5),
                                             ("cautious", "density", 0.0), ("previous", "norm", 1.0)])
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
def test_plain_adamw_kernel_equals_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3000, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AlphaAdam([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, masking=False, cpu_kernel=True)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for step in range(20):
        g = torch.randn(3000, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@needs_c
@pytest.mark.parametrize("cls", [AlphaAdam, CautiousAdamW])
def test_optimizer_c_path_equals_eager_with_mixed_tensors(cls):
    """In one optimizer, fp32 tensors take the C kernel and a bf16 tensor the compiled path; a tensor
    without a gradient is skipped.  (Single-path agreement, diagnostics included: test_fast_matches_eager.)"""
    def params():
        gen = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(33, 17), (64,), (5, 5)]] + \
            [torch.nn.Parameter(torch.randn(9, generator=gen).to(torch.bfloat16))]
    a, b = params(), params()
    fast, eager = cls(a, lr=1e-2, weight_decay=0.1, cpu_kernel=True), cls(b, lr=1e-2, weight_decay=0.1, fast=False)
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


def test_unbuildable_kernel_falls_back_or_raises(monkeypatch, tmp_path):
    """No compiler: load() returns None with a reason, cpu_kernel=None uses the other paths and
    cpu_kernel=True says why it cannot."""
    monkeypatch.setattr(CK, "_LIB", None)
    monkeypatch.setattr(CK, "_TRIED", False)
    monkeypatch.setattr(CK, "_ERROR", None)
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert CK.load() is None and "no C compiler" in CK.error()
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(RuntimeError, match="C kernel is unavailable"):
        AlphaAdam([p], cpu_kernel=True)
    opt = AlphaAdam([p], lr=0.1, fast=False)
    p.grad = torch.ones(4)
    opt.step()
    assert p.detach().lt(1.0).all()
    with pytest.raises(ValueError, match="cpu_kernel"):
        AlphaAdam([p], cpu_kernel="yes")
    with pytest.raises(ValueError, match="needs the fast path"):
        AlphaAdam([p], cpu_kernel=True, fast=False)


@needs_c
def test_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(CK, "_LIB", None)
    monkeypatch.setattr(CK, "_TRIED", False)
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    assert CK.load() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(CK, "_TRIED", False)
    assert CK.load() is not None
    assert built[0].stat().st_mtime_ns == mtime
