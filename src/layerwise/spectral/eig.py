"""Batched eigenvalues of the smaller Gram matrix of 2-D weights (the empirical spectral density, ESD).

Convention (AlphaDecay's, see METHODS.md §1): for ``W`` of shape ``(out, in)`` the ESD is the set of
eigenvalues of the smaller Gram matrix, ``W Wᵀ`` when ``out <= in`` and ``Wᵀ W`` otherwise, i.e. the
squared singular values of ``W``; ``N = min(out, in)`` values, ascending, no normalisation.

Speed: matrices of equal shape share one batched matmul; Gram matrices of equal size share one
``eigvalsh`` call.  The Gram product is cheap; the symmetric eigensolver is the cost (its Householder
tridiagonalisation, ``?sytrd``, is half matrix-vector work and does not scale with threads).  Two solvers:

* ``"lapack"`` — SciPy's LAPACK (``?syevr``, eigenvalues only, OpenBLAS held to one thread for the call),
  one matrix at a time.  On the project's AMD EPYC machine it is 1.3–1.4× faster than ``torch.linalg.eigvalsh``
  (which calls MKL's ``?syevd``; MKL takes a slower code path on AMD CPUs): 56 Gram matrices of 512 × 512 in
  0.39 s against 0.51–0.55 s (``benchmarks/eigvalsh_floor.py``).
* ``"torch"`` — ``torch.linalg.eigvalsh``, split over a small thread pool on CPU (``workers``; torch releases
  the GIL inside its kernels, which helps when another process holds a core), one batched call on CUDA.

``solver="auto"`` (default) uses ``"lapack"`` for CPU tensors when SciPy is importable, ``"torch"`` otherwise.
"""
from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

__all__ = ["gram_eigvals", "gram_matrices", "SOLVERS"]

SOLVERS = ("auto", "lapack", "torch")
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < workers:
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


@torch.no_grad()
def gram_matrices(weights: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The smaller Gram matrix of each 2-D weight (``W Wᵀ`` if ``out <= in`` else ``Wᵀ W``) in ``dtype``.

    Weights of equal shape, dtype and device are stacked and multiplied in one batched matmul.
    """
    _check(weights)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        groups[(tuple(w.shape), w.device, w.dtype)].append(i)
    out: list[torch.Tensor | None] = [None] * len(weights)
    for (shape, _, _), idx in groups.items():
        w = torch.stack([weights[i].detach() for i in idx]).to(dtype)
        g = w @ w.mT if shape[0] <= shape[1] else w.mT @ w
        for j, i in enumerate(idx):
            out[i] = g[j]
    return out  # type: ignore[return-value]


def _eigvalsh_batch(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(g)


_BLAS_CTL: object | None = None


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
    return _BLAS_CTL.limit(limits=1, user_api="blas")  # type: ignore[attr-defined]


def _have_scipy() -> bool:
    try:
        import scipy.linalg.lapack  # noqa: F401
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return True


def _lapack_eigvalsh(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of a CPU batch of symmetric matrices with SciPy's ``?syevr``; ``g`` is
    overwritten."""
    from scipy.linalg import lapack

    fn = lapack.ssyevr if g.dtype == torch.float32 else lapack.dsyevr
    arr = g.numpy()
    out = torch.empty(g.shape[:2], dtype=g.dtype)
    ev = out.numpy()
    with _one_blas_thread():
        for j in range(arr.shape[0]):
            # arr[j].T is the Fortran-ordered view of the same (symmetric) matrix: no copy
            w, _, m, _, info = fn(arr[j].T, compute_v=0, overwrite_a=1)
            if info != 0 or m != arr.shape[1]:
                raise RuntimeError(f"LAPACK ?syevr failed on matrix {j} of the batch (info={info})")
            ev[j] = w[:m]
    return out


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
        workers: CPU threads over which each batched ``eigvalsh`` is split (``None``: ``torch.get_num_threads()``
            capped by the core count; ``1``: no pool).  Used by the ``"torch"`` solver on CPU only.
        solver: ``"auto"`` (default), ``"lapack"`` (SciPy's ``?syevr``; CPU only) or ``"torch"``
            (``torch.linalg.eigvalsh``); see the module docstring.  Both agree to fp32 rounding.

    Returns:
        For a sequence, a list (same order) of 1-D tensors of length ``min(out, in)``, ascending, in ``dtype``
        on each weight's device; for a single tensor, one such tensor.  Tiny negative eigenvalues from
        round-off are clamped to 0.  A matrix with a NaN or Inf entry yields an all-NaN vector (the other
        matrices are unaffected).  Runs under ``torch.no_grad()``.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram_eigvals: dtype must be torch.float32 or torch.float64, got {dtype}")
    if solver not in SOLVERS:
        raise ValueError(f"gram_eigvals: solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "lapack" and not _have_scipy():  # pragma: no cover - scipy is a dependency
        raise ImportError("gram_eigvals: solver='lapack' needs SciPy (pip install scipy)")
    single = isinstance(weights, torch.Tensor)
    ws: list[torch.Tensor] = [weights] if single else list(weights)  # type: ignore[list-item]
    if not ws:
        return []
    grams = gram_matrices(ws, dtype)

    # group Gram matrices by (size, device) for one eigvalsh per group
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, g in enumerate(grams):
        groups[(g.shape[0], g.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(ws)
    for (n, device), idx in groups.items():
        g = torch.stack([grams[i] for i in idx])
        finite = torch.isfinite(g).flatten(1).all(dim=1)
        all_finite = bool(finite.all())
        if not all_finite:  # eigvalsh fails or returns garbage on NaN/Inf: solve a zero matrix instead
            g = torch.where(finite[:, None, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
        nw = _default_workers() if workers is None else int(workers)
        if nw < 1:
            raise ValueError(f"gram_eigvals: workers must be >= 1 or None, got {workers}")
        use_lapack = device.type == "cpu" and (solver == "lapack" or (solver == "auto" and _have_scipy()))
        if solver == "lapack" and device.type != "cpu":
            raise ValueError(f"gram_eigvals: solver='lapack' runs on CPU tensors only, got a matrix on {device}")
        if use_lapack:
            ev = _lapack_eigvalsh(g)  # g is our own stacked copy: overwriting it is safe
        elif device.type == "cpu" and nw > 1 and len(idx) > 1:
            # a few chunks per worker: if another process holds a core, the free worker takes more of the work
            chunks = g.tensor_split(min(4 * nw, len(idx)))
            ev = torch.cat(list(_pool(nw).map(_eigvalsh_batch, chunks)))
        else:
            ev = torch.linalg.eigvalsh(g)
        ev = ev.clamp_(min=0)
        if not all_finite:
            ev[~finite] = float("nan")
        for j, i in enumerate(idx):
            out[i] = ev[j]
    return out[0] if single else out  # type: ignore[return-value]
