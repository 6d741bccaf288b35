"""Batched eigenvalues of the smaller Gram matrix of 2-D weights (the empirical spectral density, ESD).

Convention (AlphaDecay's, see ``docs/methods.md`` §1): for ``W`` of shape ``(out, in)`` the ESD is the set of
eigenvalues of the smaller Gram matrix, ``W Wᵀ`` when ``out <= in`` and ``Wᵀ W`` otherwise, i.e. the
squared singular values of ``W``; ``N = min(out, in)`` values, ascending, no normalisation.

Speed: matrices of equal shape share one batched matmul; Gram matrices of equal size share one
``eigvalsh`` call.  The Gram product is cheap; the symmetric eigensolver is the cost (its Householder
tridiagonalisation, ``?sytrd``, is half matrix-vector work and does not scale with threads).  Two solvers:

* ``"lapack"`` — SciPy's LAPACK (``?syevr`` from ``scipy.linalg.cython_lapack``, eigenvalues only, OpenBLAS
  held to one thread), called through ctypes so that the GIL is released: ``workers`` eigensolver threads
  run at once, each on its own chunks of matrices.  On the project's AMD EPYC machine one such solver is 1.3–1.4×
  faster than ``torch.linalg.eigvalsh`` (MKL's ``?syevd``; MKL takes a slower code path on AMD CPUs): 56 Gram matrices
  of 512 × 512 in 0.39 s against 0.51–0.55 s; two threads take 0.20 s (``benchmarks/eigvalsh_floor.py``).
* ``"torch"`` — ``torch.linalg.eigvalsh``: one batched call on the calling thread (CPU and CUDA); on CPU,
  MKL threads it itself and ``workers`` is not used.  It is deliberately *not* run from a thread pool:
  every non-main thread that enters torch's OpenMP code gets its own OpenMP team, and once libgomp manages
  more threads than there are CPUs it stops spinning between parallel regions ("throttled" spin), so every
  later multi-region kernel of the process (``torch.linalg.svdvals``: ~1,500 futex sleeps per call instead
  of ~1) ran ~3× slower for as long as the pool lived.  The ``"lapack"`` workers run no torch/OpenMP code.

``solver="auto"`` (default) uses ``"lapack"`` for CPU tensors when SciPy is importable, ``"torch"`` otherwise.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import threadpoolctl

__all__ = ["gram_eigvals", "gram_matrices", "SOLVERS"]

SOLVERS = ("auto", "lapack", "torch")
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != workers:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layerwise-eigvalsh")
        _POOL_SIZE = workers
    return _POOL


def _default_workers() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _check(weights: Sequence[torch.Tensor]) -> None:
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"gram_eigvals: weights[{i}] is a {type(w).__name__}, expected a torch.Tensor")
        if w.ndim != 2:
            raise ValueError(f"gram_eigvals: weights[{i}] has shape {tuple(w.shape)}; expected a 2-D matrix")
        if w.numel() == 0:
            raise ValueError(f"gram_eigvals: weights[{i}] has shape {tuple(w.shape)}; expected a non-empty matrix")
        if w.is_complex():
            raise TypeError(f"gram_eigvals: weights[{i}] is complex ({w.dtype}); only real matrices are supported")


def _gram_batches(weights: Sequence[torch.Tensor], dtype: torch.dtype) -> dict[tuple, tuple[list[int], torch.Tensor]]:
    """The smaller Gram matrix of every weight, written straight into one ``(k, n, n)`` batch per
    (Gram size ``n``, device): ``{(n, device): (indices, batch)}``.  One matmul per weight into its slot
    of the batch, so neither the weights nor the Gram matrices are ever stacked (copied)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        groups[(min(w.shape), w.device)].append(i)
    out = {}
    for (n, device), idx in groups.items():
        batch = torch.empty((len(idx), n, n), dtype=dtype, device=device)
        for j, i in enumerate(idx):
            w = weights[i].detach()
            w = w if w.dtype == dtype else w.to(dtype)
            if w.shape[0] <= w.shape[1]:
                torch.matmul(w, w.mT, out=batch[j])
            else:
                torch.matmul(w.mT, w, out=batch[j])
        out[(n, device)] = (idx, batch)
    return out


@torch.no_grad()
def gram_matrices(weights: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The smaller Gram matrix of each 2-D weight (``W Wᵀ`` if ``out <= in`` else ``Wᵀ W``) in ``dtype``.

    Returned tensors are views into one batch per (Gram size, device).
    """
    _check(weights)
    by_index: dict[int, torch.Tensor] = {}
    for idx, batch in _gram_batches(weights, dtype).values():
        for j, i in enumerate(idx):
            by_index[i] = batch[j]
    return [by_index[i] for i in range(len(weights))]


_BLAS_CTL: threadpoolctl.ThreadpoolController | None = None


def _one_blas_thread():
    """A context holding SciPy's OpenBLAS to one thread (threadpoolctl; a no-op without it): for
    ``n`` ≈ 500 its threads cost more than they give."""
    global _BLAS_CTL
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        import contextlib

        return contextlib.nullcontext()
    if _BLAS_CTL is None:
        _BLAS_CTL = threadpoolctl.ThreadpoolController()
    return _BLAS_CTL.limit(limits=1, user_api="blas")


def _have_scipy() -> bool:
    try:
        import scipy.linalg.lapack  # noqa: F401
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return True


_SYEVR: dict[torch.dtype, object] = {}


def _nogil_syevr(dtype: torch.dtype):
    """``?syevr`` from ``scipy.linalg.cython_lapack`` (SciPy's public C-level LAPACK), called through
    ctypes, which releases the GIL: several eigensolvers then run at once (the f2py wrappers of
    ``scipy.linalg.lapack`` hold the GIL, so threads over them run one after the other).  ``None`` if the
    capsule cannot be read; the f2py wrapper is used then."""
    if dtype in _SYEVR:
        return _SYEVR[dtype]
    fn = None
    try:
        import ctypes

        import numpy as np
        from scipy.linalg import cython_lapack

        prefix = "s" if dtype == torch.float32 else "d"
        cap = cython_lapack.__pyx_capi__[prefix + "syevr"]
        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype = ctypes.c_char_p
        api.PyCapsule_GetName.argtypes = [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        ptr = api.PyCapsule_GetPointer(cap, api.PyCapsule_GetName(cap))
        raw = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 21))(ptr)  # 21 pointer arguments, Fortran style
        real = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
        npt = np.float32 if dtype == torch.float32 else np.float64
        sizes: dict[int, tuple[int, int]] = {}

        def call(a, w, work, lwork, iwork, liwork) -> tuple[int, int]:
            n = a.shape[0]
            ints = {
                k: ctypes.c_int(v)
                for k, v in dict(n=n, lda=n, il=1, iu=n, m=0, ldz=1, lwork=lwork, liwork=liwork, info=0).items()
            }
            zero = real(0.0)
            z, isuppz = np.empty(1, npt), np.empty(2 * n, np.int32)
            r = ctypes.byref
            raw(
                r(ctypes.c_char(b"N")),
                r(ctypes.c_char(b"A")),
                r(ctypes.c_char(b"L")),
                r(ints["n"]),
                a.ctypes.data,
                r(ints["lda"]),
                r(zero),
                r(zero),
                r(ints["il"]),
                r(ints["iu"]),
                r(zero),
                r(ints["m"]),
                w.ctypes.data,
                z.ctypes.data,
                r(ints["ldz"]),
                isuppz.ctypes.data,
                work.ctypes.data,
                r(ints["lwork"]),
                iwork.ctypes.data,
                r(ints["liwork"]),
                r(ints["info"]),
            )
            return ints["info"].value, ints["m"].value

        def syevr(a):  # a: C-contiguous symmetric (n, n) array of npt, overwritten; returns (w, info, m)
            n = a.shape[0]
            if n not in sizes:  # workspace query, once per size
                wq, iwq = np.empty(1, npt), np.empty(1, np.int32)
                call(a.copy(), np.empty(n, npt), wq, -1, iwq, -1)
                sizes[n] = (max(int(wq[0]), 26 * n), max(int(iwq[0]), 10 * n))
            lw, liw = sizes[n]
            w = np.empty(n, npt)
            info, m = call(a, w, np.empty(lw, npt), lw, np.empty(liw, np.int32), liw)
            return w, info, m

        fn = syevr
    except Exception:  # pragma: no cover - SciPy without cython_lapack capsules: the f2py wrapper serves
        fn = None
    _SYEVR[dtype] = fn
    return fn


def _lapack_eigvalsh(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of a CPU batch of symmetric matrices with LAPACK's ``?syevr``; ``g`` is
    overwritten."""
    arr = g.numpy()
    out = torch.empty(g.shape[:2], dtype=g.dtype)
    ev = out.numpy()
    fast = _nogil_syevr(g.dtype)
    if fast is None:
        from scipy.linalg import lapack

        f2py = lapack.ssyevr if g.dtype == torch.float32 else lapack.dsyevr
    for j in range(arr.shape[0]):
        if fast is not None:
            w, info, m = fast(arr[j])
        else:  # arr[j].T is the Fortran-ordered view of the same (symmetric) matrix: no copy
            w, _, m, _, info = f2py(arr[j].T, compute_v=0, overwrite_a=1)
        if info != 0 or m != arr.shape[1]:
            raise RuntimeError(f"LAPACK ?syevr failed on matrix {j} of the batch (info={info})")
        ev[j] = w[:m]
    return out


def _safe_range(dtype: torch.dtype, n: int) -> tuple[float, float]:
    """``(lo, hi)``: a Gram matrix of size ``n`` whose largest diagonal entry lies outside this range is
    formed again from a rescaled weight.  Below ``lo`` (√tiny) products of the entries underflow into
    subnormals or zero; above ``hi`` the trace (≥ λ_max) may overflow."""
    fi = torch.finfo(dtype)
    return fi.tiny**0.5, fi.max / (4.0 * n)


def _rescaled(ws, idx, g, finite, suspect, dtype):
    """Form the Gram matrices of the ``suspect`` rows of batch ``g`` again from ``W / s`` with ``s`` a power
    of two near ``max|W|`` (exact: no rounding), so that they are finite and keep their small entries.
    Returns ``(g, finite, scale2)`` with ``scale2[j] = s_j²`` (1 where untouched), float64 on the host."""
    scale2 = torch.ones(len(idx), dtype=torch.float64)
    finite = finite.clone()
    for j in torch.nonzero(suspect.cpu()).flatten().tolist():
        w = ws[idx[j]].detach()
        w = w if w.dtype == dtype else w.to(dtype)
        amax = float(w.abs().amax())
        if not math.isfinite(amax) or amax == 0.0:  # NaN/Inf in W itself: stays non-finite (NaN result)
            continue
        e = math.frexp(amax)[1]  # amax = m * 2**e with 0.5 <= m < 1
        ws_ = torch.ldexp(w, torch.tensor(-e, dtype=torch.int32, device=w.device)).to(dtype)
        if ws_.shape[0] <= ws_.shape[1]:
            torch.matmul(ws_, ws_.mT, out=g[j])
        else:
            torch.matmul(ws_.mT, ws_, out=g[j])
        finite[j] = bool(torch.isfinite(g[j].diagonal()).all())
        scale2[j] = 4.0**e
    return g, finite, scale2


def _unscale(ev: torch.Tensor, scale2: float, dtype: torch.dtype) -> torch.Tensor:
    """Eigenvalues of a rescaled Gram matrix times ``s²``: in ``dtype`` when they fit (no overflow, no
    non-zero value flushed to zero), else in float64 (a matrix with entries ~1e19 or ~1e-30 in fp32)."""
    e64 = ev.double() * scale2
    if dtype == torch.float64:
        return e64
    back = e64.to(dtype)
    if bool(torch.isfinite(back).all()) and bool(((back > 0) | (e64 == 0) | torch.isnan(e64)).all()):
        return back
    return e64


@torch.no_grad()
def gram_eigvals(
    weights: Sequence[torch.Tensor] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    workers: int | None = None,
    solver: str = "auto",
) -> list[torch.Tensor] | torch.Tensor:
    """Ascending eigenvalues of the smaller Gram matrix of each 2-D weight (= squared singular values).

    Args:
        weights: a sequence of 2-D tensors (any shapes, dtypes, devices), or one 2-D tensor.
        dtype: compute dtype, ``torch.float32`` (default; bf16/fp16 weights are upcast) or ``torch.float64``.
        workers: CPU threads for the LAPACK eigensolvers (``None``: ``torch.get_num_threads()`` capped by
            the core count; ``1``: one).  With ``solver="lapack"`` each batch of Gram matrices is split over
            them; the torch solver (and CUDA) makes one batched call.
        solver: ``"auto"`` (default), ``"lapack"`` (SciPy's ``?syevr``; CPU only) or ``"torch"``
            (``torch.linalg.eigvalsh``); see the module docstring.  Both agree to fp32 rounding.

    Returns:
        For a sequence, a list (same order) of 1-D tensors of length ``min(out, in)``, ascending, in ``dtype``
        on each weight's device; for a single tensor, one such tensor.  Tiny negative eigenvalues from
        round-off are clamped to 0.  A matrix with a NaN or Inf entry yields an all-NaN vector (the other
        matrices are unaffected).  A finite matrix whose Gram matrix would overflow or underflow ``dtype``
        (entries ~1e19 or ~1e-30 in float32) is formed from ``W / 2**k`` and its eigenvalues scaled back;
        when they do not fit ``dtype`` they are returned in float64 for that matrix.  Runs under ``torch.no_grad()``.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram_eigvals: dtype must be torch.float32 or torch.float64, got {dtype}")
    if solver not in SOLVERS:
        raise ValueError(f"gram_eigvals: solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "lapack" and not _have_scipy():  # pragma: no cover - scipy is a dependency
        raise ImportError("gram_eigvals: solver='lapack' needs SciPy (pip install scipy)")
    single = isinstance(weights, torch.Tensor)
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws:
        return []
    nw = _default_workers() if workers is None else int(workers)
    if nw < 1:
        raise ValueError(f"gram_eigvals: workers must be >= 1 or None, got {workers}")
    _check(ws)
    if solver == "lapack":
        bad = next((w.device for w in ws if w.device.type != "cpu"), None)
        if bad is not None:
            raise ValueError(f"gram_eigvals: solver='lapack' runs on CPU tensors only, got a matrix on {bad}")
    use_lapack = solver == "lapack" or (solver == "auto" and _have_scipy())
    out: dict[int, torch.Tensor] = {}  # input index -> eigenvalues
    # all Gram matrices first: overlapping them with the eigensolvers measured slower
    for (n, device), (idx, g) in _gram_batches(ws, dtype).items():
        # a NaN/Inf in W makes a diagonal entry of its Gram matrix non-finite (G_ii = sum_k W_ik^2), and
        # |G_ij| <= sqrt(G_ii G_jj): checking the diagonal is enough, and costs nothing
        diag = g.diagonal(dim1=-2, dim2=-1)
        finite = torch.isfinite(diag).all(dim=1)
        dmax = diag.amax(dim=1)
        lo, hi = _safe_range(dtype, n)
        # out of the safe range (an overflowed or underflowing Gram matrix of a finite W): rescale those
        suspect = ~finite | (dmax < lo) | (dmax > hi)  # dmax == 0: underflowed, or a zero W
        scale2 = None
        if bool(suspect.any()):
            g, finite, scale2 = _rescaled(ws, idx, g, finite, suspect, dtype)
        all_finite = bool(finite.all())
        if not all_finite:  # eigensolvers fail or return garbage on NaN/Inf: solve a zero matrix instead
            g = torch.where(finite[:, None, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
        # a few chunks per worker: if another process holds a core, the free worker takes more of the work
        chunks = g.tensor_split(min(4 * nw, len(idx))) if nw > 1 and len(idx) > 1 else None
        if device.type == "cpu" and use_lapack:
            with _one_blas_thread():  # process-wide OpenBLAS setting: set here, not in each worker
                ev = torch.cat(list(_pool(nw).map(_lapack_eigvalsh, chunks))) if chunks else _lapack_eigvalsh(g)
        else:  # torch's solver: on the calling thread only (see the module docstring)
            ev = torch.linalg.eigvalsh(g)
        ev = ev.clamp_(min=0)
        finite &= torch.isfinite(ev).all(dim=1)  # e.g. an off-diagonal overflow the diagonal did not show
        ev[~finite] = float("nan")
        for j, i in enumerate(idx):
            out[i] = ev[j]
        if scale2 is not None:
            for j in torch.nonzero(scale2 != 1).flatten().tolist():
                out[idx[j]] = _unscale(ev[j], float(scale2[j]), dtype)
    res = [out[i] for i in range(len(ws))]
    return res[0] if single else res
