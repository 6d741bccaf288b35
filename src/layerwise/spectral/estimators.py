"""Power-law tail exponents of an ESD: the Hill estimator of AlphaDecay and Clauset's KS-fitted estimator.

Both fit a continuous power law ``p(λ) ∝ λ^(-α)`` for ``λ >= xmin`` to the tail of an ascending eigenvalue
vector ``λ_0 <= ... <= λ_{N-1}`` by maximum likelihood: with the tail ``T = {λ_j >= xmin}`` of ``n`` values,
``α = 1 + n / Σ_{j∈T} ln(λ_j / xmin)`` (the value at ``xmin`` is counted in ``n``; its log term is 0).
They differ in the choice of ``xmin``:

* :func:`hill_alpha` / :func:`hill_fit` - AlphaDecay's fixed threshold ``xmin = λ[N // 2]``, ``n = N - N // 2``
  (``docs/methods.md`` §1, the faithful default);
* :func:`ks_alpha` - Clauset, Shalizi & Newman (2009): the ``xmin`` among the candidates that minimises the
  Kolmogorov-Smirnov distance between the tail's empirical CDF and the fitted power law's CDF
  ``P(λ) = 1 - (λ / xmin)^(1-α)``.  All candidates are evaluated at once from suffix sums of ``ln λ``.

KS distance (both fits report it as fit quality): for the sorted tail ``x_0 <= ... <= x_{n-1}``,
``D = max_m max((m + 1) / n - P(x_m), P(x_m) - m / n)``, the sup-norm distance of the two CDFs.

Undefined cases give ``α = NaN`` with a reason (never an exception): non-finite eigenvalues, an all-zero
spectrum, fewer than ``min_n`` eigenvalues, ``xmin`` at numerical zero (eigenvalues ``<= rtol · λmax`` count as
zero; default ``rtol = 10 · √N · eps(dtype)``, i.e. a rank-deficient matrix), or a flat tail (all tail
values equal, so the sum of logs is 0).

Shape correction: a Gaussian random matrix reads a Hill α that depends on its aspect ratio (≈ 2.13 square,
≈ 3.0 at 1:2.7), see :func:`noise_alpha` and :func:`shape_corrected_alpha`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TailFit:
    """Result of a tail fit.

    For a single 1-D eigenvalue vector, ``alpha``, ``xmin``, ``ks`` are Python floats and ``n_tail`` an int;
    for a sequence (or a 2-D batch) they are 1-D tensors (float64 / int64, CPU) with one entry per input.
    ``reasons`` holds, per input, ``None`` when ``alpha`` is defined and a short explanation when it is NaN.
    """

    alpha: torch.Tensor | float
    xmin: torch.Tensor | float
    ks: torch.Tensor | float
    n_tail: torch.Tensor | int
    reasons: list[str | None] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        """The reason of a single fit (first entry of ``reasons``)."""
        return self.reasons[0] if self.reasons else None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, xmin, ks, n_tail)`` as 1-D float64 / int64 tensors with one entry per input (one entry for
        a single fit)."""
        f64 = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (self.alpha, self.xmin, self.ks)]
        return f64[0], f64[1], f64[2], torch.as_tensor(self.n_tail, dtype=torch.int64).reshape(-1)


# ----------------------------------------------------------------------------------------------- helpers
def _as_list(eigs) -> tuple[list[torch.Tensor], bool]:
    """Normalise input to a list of 1-D tensors; second value says whether the input was one 1-D vector."""
    if isinstance(eigs, torch.Tensor):
        if eigs.ndim == 1:
            return [eigs], True
        if eigs.ndim == 2:
            return list(eigs.unbind(0)), False
        raise ValueError(
            f"eigs must be a 1-D tensor, a 2-D batch or a sequence of 1-D tensors; got shape {tuple(eigs.shape)}"
        )
    out = []
    for i, e in enumerate(eigs):
        if not isinstance(e, torch.Tensor):
            raise TypeError(f"eigs[{i}] is a {type(e).__name__}, expected a 1-D torch.Tensor")
        if e.ndim != 1:
            raise ValueError(f"eigs[{i}] has shape {tuple(e.shape)}; expected a 1-D eigenvalue vector")
        out.append(e)
    return out, False


def _default_rtol(n: int, dtype: torch.dtype) -> float:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    return 10.0 * math.sqrt(max(n, 1)) * eps


def _precheck(e: torch.Tensor, min_n: int, rtol: float | None) -> tuple[str | None, float]:
    """Reason the fit is undefined before choosing xmin (or None), and the numerical-zero threshold."""
    n = e.numel()
    if n == 0:
        return "empty spectrum", 0.0
    if not bool(torch.isfinite(e).all()):
        return "non-finite eigenvalues (NaN/Inf in the matrix)", 0.0
    lmax = float(e[-1])
    if lmax <= 0.0:
        return "zero matrix (all eigenvalues are 0)", 0.0
    if n < min_n:
        return f"too few eigenvalues (N={n} < min_n={min_n})", 0.0
    tol = (_default_rtol(n, e.dtype) if rtol is None else float(rtol)) * lmax
    return None, tol


def _ks_of_tail(tail_log: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """KS distance(s) of sorted tails (``ln(λ/xmin)``, shape (..., n)) to power laws with exponent(s) alpha."""
    n = tail_log.shape[-1]
    p = -torch.expm1(-(alpha[..., None] - 1.0) * tail_log)  # theoretical CDF, 1 - (λ/xmin)^(1-α)
    m = torch.arange(n, dtype=tail_log.dtype, device=tail_log.device)
    return torch.maximum((m + 1) / n - p, p - m / n).amax(-1)


def ks_distance(tail: torch.Tensor, xmin: float, alpha: float) -> float:
    """KS distance between the sorted values ``tail`` (all ``>= xmin``) and a power law ``(xmin, alpha)``."""
    t = tail.detach().to(torch.float64).cpu()
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"ks_distance: tail must be a non-empty 1-D tensor, got shape {tuple(tail.shape)}")
    if not (xmin > 0 and math.isfinite(alpha) and alpha > 1):
        return float("nan")
    logs = torch.log(t.sort().values / xmin)
    return float(_ks_of_tail(logs, torch.tensor(float(alpha), dtype=torch.float64)))


def _unfitted(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str | None]]:
    """Result buffers for ``b`` inputs: alpha, xmin, ks NaN (float64) until a fit sets them, n_tail 0, no reasons."""
    alpha, xmin, ks = (torch.full((b,), float("nan"), dtype=torch.float64) for _ in range(3))
    return alpha, xmin, ks, torch.zeros((b,), dtype=torch.int64), [None] * b


def _pack(alpha, xmin, ks, n_tail, reasons, single: bool) -> TailFit:
    if single:
        return TailFit(float(alpha[0]), float(xmin[0]), float(ks[0]), int(n_tail[0]), reasons)
    return TailFit(alpha, xmin, ks, n_tail, reasons)


# ----------------------------------------------------------------------------------------------- Hill
@torch.no_grad()
def hill_fit(eigs, *, min_n: int = 1, rtol: float | None = None) -> TailFit:
    """AlphaDecay's Hill estimator with its fixed threshold, plus ``xmin``, KS distance, tail size, reason.

    With ascending ``λ`` of length ``N``: ``i = N // 2``, ``xmin = λ[i]``, ``n = N - i``,
    ``α = 1 + n / Σ_{j >= i} ln(λ_j / xmin)``, computed in float64.  ``min_n`` (default 1: only the formula's
    own conditions) sets a minimum ``N``; ``rtol`` the numerical-zero threshold (see module docstring).

    Args:
        eigs: one ascending 1-D eigenvalue tensor, a 2-D batch (one vector per row), or a sequence of them
            (lengths may differ; equal lengths are computed together).
    """
    es, single = _as_list(eigs)
    alpha, xmin, ks, n_tail, reasons = _unfitted(len(es))

    # group valid inputs of equal length; compute each group in one shot
    groups: dict[tuple[int, torch.device], list[int]] = {}
    tols: dict[int, float] = {}
    for k, e in enumerate(es):
        reason, tol = _precheck(e, min_n, rtol)
        if reason is not None:
            reasons[k] = reason
            continue
        tols[k] = tol
        groups.setdefault((e.numel(), e.device), []).append(k)
    for (n_all, _), idx in groups.items():
        e = torch.stack([es[k].detach() for k in idx]).to(torch.float64)
        i = n_all // 2
        xm = e[:, i]
        logs = torch.log(e[:, i:] / xm[:, None])
        s = logs.sum(-1)
        a = 1.0 + (n_all - i) / s
        d = _ks_of_tail(logs, a)
        xm_c, a_c, d_c, s_c = xm.cpu(), a.cpu(), d.cpu(), s.cpu()
        for j, k in enumerate(idx):
            xmin[k] = xm_c[j]
            n_tail[k] = n_all - i
            if float(xm_c[j]) <= tols[k]:
                reasons[k] = "xmin is numerically zero (rank-deficient matrix)"
            elif not float(s_c[j]) > 0.0:
                reasons[k] = "flat tail (all tail eigenvalues equal; sum of logs is 0)"
            else:
                alpha[k] = a_c[j]
                ks[k] = d_c[j]
    return _pack(alpha, xmin, ks, n_tail, reasons, single)


def hill_alpha(eigs, *, min_n: int = 1, rtol: float | None = None) -> torch.Tensor | float:
    """AlphaDecay's α: ``xmin = λ[N // 2]``, ``n = N - N // 2``, ``α = 1 + n / Σ_{j >= N//2} ln(λ_j / xmin)``.

    ``eigs``: an ascending 1-D tensor (returns a float), or a 2-D batch / sequence of 1-D tensors (returns a
    float64 CPU tensor, one α per input).  NaN where undefined; :func:`hill_fit` gives the reason.
    """
    return hill_fit(eigs, min_n=min_n, rtol=rtol).alpha


# ----------------------------------------------------------------------------------------------- KS / Clauset
_CHUNK_ELEMS = 1 << 22  # candidates x N elements evaluated at once


def _ks_search_one(
    e: torch.Tensor, tol: float, xmin_range, min_tail: int
) -> tuple[float, float, float, int, str | None]:
    n_all = e.numel()
    logs = torch.log(torch.where(e > tol, e, torch.ones((), dtype=e.dtype, device=e.device)))
    # candidates: first index of each distinct positive value, with a tail of at least min_tail values
    idx = torch.arange(n_all, device=e.device)
    cand = e > tol
    cand[1:] &= e[1:] > e[:-1]
    cand &= (n_all - idx) >= min_tail
    if xmin_range is not None:
        lo, hi = xmin_range
        if lo is not None:
            cand &= e >= lo
        if hi is not None:
            cand &= e <= hi
    ks_idx = torch.nonzero(cand).flatten()
    if ks_idx.numel() == 0:
        return math.nan, math.nan, math.nan, 0, "no xmin candidate (tail shorter than min_tail or outside xmin_range)"
    suffix = logs.flip(0).cumsum(0).flip(0)  # S_k = Σ_{j>=k} ln λ_j
    n = (n_all - ks_idx).to(e.dtype)
    s = suffix[ks_idx] - n * logs[ks_idx]  # Σ_{j>=k} ln(λ_j / λ_k)
    alpha = 1.0 + n / s  # inf where the tail is flat
    m_all = torch.arange(n_all, dtype=e.dtype, device=e.device)
    dists = []
    chunk = max(1, _CHUNK_ELEMS // n_all)
    for c0 in range(0, ks_idx.numel(), chunk):
        k = ks_idx[c0 : c0 + chunk]
        a = alpha[c0 : c0 + chunk]
        nn_ = n[c0 : c0 + chunk]
        rel = logs[None, :] - logs[k][:, None]  # ln(λ_j/λ_k), (K, N)
        m = m_all[None, :] - k[:, None].to(e.dtype)  # position in the tail
        p = -torch.expm1(-(a[:, None] - 1.0) * rel)
        d = torch.maximum((m + 1) / nn_[:, None] - p, p - m / nn_[:, None])
        d = torch.where(m >= 0, d, torch.full((), -math.inf, dtype=e.dtype, device=e.device)).amax(-1)
        d = torch.where(torch.isfinite(a), d, torch.full((), math.inf, dtype=e.dtype, device=e.device))
        dists.append(d)
    dist = torch.cat(dists)
    j = int(torch.argmin(dist))  # first minimum: the smallest xmin among ties
    if not math.isfinite(float(dist[j])):
        return math.nan, math.nan, math.nan, 0, "flat tail for every xmin candidate"
    best_k = int(ks_idx[j])
    return float(alpha[j]), float(e[best_k]), float(dist[j]), n_all - best_k, None


@torch.no_grad()
def ks_alpha(
    eigs,
    xmin_range: tuple[float | None, float | None] | None = None,
    *,
    min_tail: int = 10,
    min_n: int = 1,
    rtol: float | None = None,
) -> TailFit:
    """Clauset's power-law fit: the ``xmin`` that minimises the KS distance, and the MLE α above it.

    Candidates are the distinct positive eigenvalues with at least ``min_tail`` values at or above them
    (and, when ``xmin_range=(lo, hi)`` is given, ``lo <= xmin <= hi``; either bound may be ``None``).  For
    every candidate ``k`` at once: ``α_k = 1 + n_k / (S_k - n_k ln λ_k)`` with suffix sums
    ``S_k = Σ_{j>=k} ln λ_j``, and its KS distance as one masked max over the (candidates × N) grid
    (chunked to bound memory) - no Python loop over candidates.  Ties in KS pick the smallest ``xmin``.
    Computed in float64.

    Returns:
        :class:`TailFit` with ``alpha``, ``xmin``, ``ks`` (the minimal KS distance) and ``n_tail`` - floats
        for one 1-D input, tensors for a batch or sequence - and per-input ``reasons`` for NaN results.
    """
    if min_tail < 2:
        raise ValueError(f"ks_alpha: min_tail must be >= 2, got {min_tail}")
    es, single = _as_list(eigs)
    alpha, xmin, ks, n_tail, reasons = _unfitted(len(es))
    for k, e in enumerate(es):
        reason, tol = _precheck(e, min_n, rtol)
        if reason is None:
            a, x, d, n, reason = _ks_search_one(e.detach().to(torch.float64), tol, xmin_range, min_tail)
            alpha[k], xmin[k], ks[k], n_tail[k] = a, x, d, n
        reasons[k] = reason
    return _pack(alpha, xmin, ks, n_tail, reasons, single)


# ----------------------------------------------------------------------------------------------- shape reference
_NOISE_CACHE: dict[tuple, float] = {}
_MAX_REF_DIM = 1024


def noise_alpha(shape: Sequence[int], estimator: str = "hill", *, samples: int = 4, seed: int = 0) -> float:
    """α that ``estimator`` reads on a Gaussian random matrix of ``shape`` (mean over ``samples`` draws).

    Seeded (``seed`` combined with the shape) and cached per ``(shape, estimator, samples, seed)``.  Shapes
    whose smaller side exceeds 1024 are sampled at a proportionally scaled-down shape with the same aspect
    ratio (the noise α depends on the aspect ratio, its dependence on size is weak) to bound the cost.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"noise_alpha: shape must be two positive ints, got {tuple(shape)}")
    if estimator not in ("hill", "ks"):
        raise ValueError(f"noise_alpha: estimator must be 'hill' or 'ks', got {estimator!r}")
    rows, cols = int(shape[0]), int(shape[1])
    if min(rows, cols) > _MAX_REF_DIM:
        f = _MAX_REF_DIM / min(rows, cols)
        rows, cols = max(1, round(rows * f)), max(1, round(cols * f))
    key = (rows, cols, estimator, samples, seed)
    if key not in _NOISE_CACHE:
        from .eig import gram_eigvals  # local import: avoid a cycle at package import

        g = torch.Generator().manual_seed(seed * 1_000_003 + rows * 7919 + cols)
        ws = [torch.randn(rows, cols, generator=g) for _ in range(samples)]
        eigs = gram_eigvals(ws)
        alpha = (hill_fit(eigs) if estimator == "hill" else ks_alpha(eigs)).tensors()[0]
        vals = alpha[torch.isfinite(alpha)]
        _NOISE_CACHE[key] = float(vals.mean()) if vals.numel() else float("nan")
    return _NOISE_CACHE[key]


def shape_corrected_alpha(
    alpha: float | torch.Tensor,
    shape: Sequence[int],
    estimator: str = "hill",
    *,
    mode: str = "difference",
    samples: int = 4,
    seed: int = 0,
) -> float | torch.Tensor:
    """α relative to what the same estimator reads on Gaussian noise of the same shape.

    ``mode="difference"`` (default): ``α - α_noise(shape) + 2`` - the excess over noise, placed on the usual
    scale so that noise of *any* shape reads 2 (a square noise matrix reads ≈ 2.13 uncorrected, so square
    matrices move by ≈ -0.13 and 1:2.7 ones by ≈ -1.0).  Differences keep α's units, so AlphaDecay's linear
    map sees the same spread between modules as before, minus the shape bias.
    ``mode="ratio"``: ``α / α_noise(shape)`` - noise reads 1.
    """
    ref = noise_alpha(shape, estimator, samples=samples, seed=seed)
    if mode == "difference":
        return alpha - ref + 2.0
    if mode == "ratio":
        return alpha / ref
    raise ValueError(f"shape_corrected_alpha: mode must be 'difference' or 'ratio', got {mode!r}")
