import pytest
import torch

from layerwise.spectral import gram_eigvals, gram_matrices

SHAPES = [(7, 7), (12, 5), (5, 12), (1, 9), (9, 1), (33, 16)]


@pytest.mark.parametrize("solver", ["lapack", "torch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_eigvals_are_squared_singular_values(shape, solver):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    ref = torch.linalg.svdvals(w).flip(0) ** 2  # ascending
    got = gram_eigvals([w], torch.float64, solver=solver)[0]
    assert got.shape == (min(shape),)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert bool((got[1:] >= got[:-1]).all())


def test_gram_is_smaller_side():
    w = torch.randn(6, 4)
    g1, g2 = gram_matrices([w, w.T])
    torch.testing.assert_close(g1, w.T @ w)  # (6, 4): WᵀW is 4x4
    torch.testing.assert_close(g2, w.T @ w)  # (4, 6): (Wᵀ)(Wᵀ)ᵀ is 4x4
    assert g1.shape == g2.shape == (4, 4)


@pytest.mark.parametrize("solver,workers", [("torch", 1), ("torch", 2), ("torch", 3), ("lapack", 1), ("auto", 2)])
def test_batched_equals_per_matrix(solver, workers):
    torch.manual_seed(1)
    ws = [
        torch.randn(20, 20),
        torch.randn(40, 20),
        torch.randn(20, 20),
        torch.randn(20, 50),
        torch.randn(8, 3),
        torch.randn(20, 20),
    ]
    batched = gram_eigvals(ws, workers=workers, solver=solver)
    for w, b in zip(ws, batched):
        single = gram_eigvals(w, workers=1, solver=solver)
        assert isinstance(single, torch.Tensor) and single.ndim == 1
        torch.testing.assert_close(b, single, rtol=1e-5, atol=1e-6)


def test_bf16_is_computed_in_fp32_and_no_grad():
    w = torch.randn(16, 24, requires_grad=True)
    wb = w.detach().bfloat16()
    e = gram_eigvals([wb])[0]
    assert e.dtype == torch.float32
    torch.testing.assert_close(e, gram_eigvals([wb.float()])[0])
    e2 = gram_eigvals([w])[0]
    assert not e2.requires_grad


def test_nonfinite_matrix_is_isolated_and_small_negatives_clamped():
    a = torch.randn(10, 10)
    bad = a.clone()
    bad[3, 4] = float("nan")
    inf = a.clone()
    inf[0, 0] = float("inf")
    r1 = torch.randn(10, 1) @ torch.randn(1, 10)  # rank 1: round-off gives tiny negatives
    ea, eb, ei, er = gram_eigvals([a, bad, inf, r1])
    assert torch.isnan(eb).all() and torch.isnan(ei).all()
    torch.testing.assert_close(ea, gram_eigvals([a])[0])
    assert (er >= 0).all()


def test_errors():
    with pytest.raises(ValueError, match="weights\\[1\\].*2-D"):
        gram_eigvals([torch.randn(3, 3), torch.randn(3)])
    with pytest.raises(TypeError, match="weights\\[0\\]"):
        gram_eigvals([[1.0, 2.0]])
    with pytest.raises(ValueError, match="dtype"):
        gram_eigvals([torch.randn(3, 3)], torch.float16)
    with pytest.raises(ValueError, match="non-empty"):
        gram_eigvals([torch.randn(0, 3)])
    assert gram_eigvals([]) == []


def test_lapack_and_torch_solvers_agree_and_leave_inputs_alone():
    torch.manual_seed(2)
    ws = [torch.randn(64, 64) * 0.02, torch.randn(96, 64) * 0.02, torch.randn(64, 96) * 0.02]
    before = [w.clone() for w in ws]
    a = gram_eigvals(ws, solver="lapack")
    b = gram_eigvals(ws, solver="torch")
    ref = [torch.linalg.svdvals(w.double()).flip(0) ** 2 for w in ws]
    for x, y, r, w, w0 in zip(a, b, ref, ws, before):
        assert x.dtype == torch.float32
        tol = 1e-6 * float(r.max())  # fp32 eigenvalues: absolute error ~ eps * lambda_max
        torch.testing.assert_close(x.double(), r, rtol=1e-4, atol=tol)
        torch.testing.assert_close(x, y, rtol=1e-4, atol=tol)
        assert torch.equal(w, w0)  # the solver overwrites only its own copy
    # a NaN matrix is isolated on the LAPACK path too
    bad = torch.randn(64, 64)
    bad[3, 4] = float("nan")
    out = gram_eigvals([ws[0], bad], solver="lapack")
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_solver_errors():
    with pytest.raises(ValueError, match="solver must be one of"):
        gram_eigvals([torch.randn(4, 4)], solver="magma")


def test_nogil_lapack_equals_the_f2py_wrapper(monkeypatch):
    """The ctypes call of cython_lapack's ?syevr (GIL released) and SciPy's f2py wrapper agree; the
    f2py wrapper serves when the capsule is unavailable."""
    from layerwise.spectral import eig as E

    assert E._nogil_syevr(torch.float32) is not None and E._nogil_syevr(torch.float64) is not None
    torch.manual_seed(3)
    ws = [torch.randn(40, 24), torch.randn(24, 24), torch.randn(30, 50, dtype=torch.float64)] * 3
    fast = gram_eigvals(ws, solver="lapack", workers=2)
    monkeypatch.setattr(E, "_SYEVR", {torch.float32: None, torch.float64: None})
    slow = gram_eigvals(ws, solver="lapack", workers=2)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.max()))
