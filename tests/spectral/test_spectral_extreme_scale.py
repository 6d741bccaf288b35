"""Gram matrices of matrices with tiny (~1e-30) or huge (~1e19) entries stay finite and non-zero (issue 19).

In float32 ``W Wᵀ`` of such matrices underflows to 0 (1e-60) or overflows to Inf (1e38·n); the eigenvalues
must still equal the squared singular values (float64 SVD reference), and α must equal that of the same
matrix at unit scale (Hill's α is scale-invariant).
"""

from __future__ import annotations

import pytest
import torch

from layerwise.spectral import analyze, gram_eigvals, hill_alpha


def _base(shape=(40, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("solver", ["lapack", "torch"])
@pytest.mark.parametrize("scale", [1e-30, 1e19])
@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_extreme_scale_eigvals_match_float64_svd(solver, scale, shape):
    a = _base(shape)
    w = (a * scale).float()
    assert torch.isfinite(w).all() and (w != 0).all()
    ref = torch.linalg.svdvals(w.double()).pow(2).flip(0)  # ascending
    e, e_unit = gram_eigvals([w, a.float()], solver=solver)
    assert torch.isfinite(e).all(), "eigenvalues must be finite"
    assert (e > 0).all(), "eigenvalues of a full-rank matrix must be non-zero"
    rel = ((e.double() - ref).abs() / ref).max().item()
    assert rel < 1e-4, rel
    assert e_unit.dtype == torch.float32  # the ordinary matrix beside it keeps the requested dtype
    assert torch.allclose(hill_alpha([e.double()]), hill_alpha([e_unit.double()]), rtol=1e-4)


def test_extreme_scale_float64_dtype_and_mixed_batch():
    a = _base((32, 48), seed=1)
    ws = [a * 1e-30, a * 1e19, a, torch.zeros(32, 48, dtype=torch.float64)]
    out = gram_eigvals(ws, dtype=torch.float64)
    for w, e in zip(ws[:3], out[:3]):
        ref = torch.linalg.svdvals(w).pow(2).flip(0)
        assert e.dtype == torch.float64
        assert torch.allclose(e, ref, rtol=1e-9, atol=0)
    assert (out[3] == 0).all()  # a true zero matrix stays zero (no rescaling of nothing)


def test_nonfinite_still_nan_next_to_huge_matrix():
    a = _base((32, 48), seed=2).float()
    bad = a.clone()
    bad[1, 2] = float("inf")
    e_bad, e_huge = gram_eigvals([bad, a * 1e19])
    assert torch.isnan(e_bad).all()
    assert torch.isfinite(e_huge).all() and (e_huge > 0).all()


def test_analyze_alpha_scale_invariant_at_extremes():
    from torch import nn

    torch.manual_seed(3)
    ref = nn.Linear(96, 64, bias=False)
    tiny, huge = nn.Linear(96, 64, bias=False), nn.Linear(96, 64, bias=False)
    with torch.no_grad():
        tiny.weight.copy_(ref.weight.double().mul(1e-30 / 0.05).float())
        huge.weight.copy_(ref.weight.double().mul(1e19 / 0.05).float())
    rows = analyze(nn.Sequential(ref, tiny, huge), select="linear").rows
    assert all(r["reason"] is None for r in rows), [r["reason"] for r in rows]
    assert rows[1]["alpha"] == pytest.approx(rows[0]["alpha"], rel=1e-4)
    assert rows[2]["alpha"] == pytest.approx(rows[0]["alpha"], rel=1e-4)
    sn = torch.linalg.matrix_norm(ref.weight.double(), ord=2).item()
    assert rows[1]["spectral_norm"] == pytest.approx(sn * 1e-30 / 0.05, rel=1e-4)
    assert rows[2]["spectral_norm"] == pytest.approx(sn * 1e19 / 0.05, rel=1e-4)
