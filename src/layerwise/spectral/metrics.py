"""Per-matrix spectral metrics computed from the ascending Gram eigenvalues ``λ`` (= squared singular values).

* ``spectral_norm`` = ``σ_max = √λ_max``;
* ``frobenius_norm`` = ``√Σλ``;
* ``stable_rank`` = ``Σλ / λ_max`` = ``‖W‖_F² / ‖W‖_2²``;
* ``top_singular_values(k)`` = the ``k`` largest ``σ = √λ``, descending;
* ``matrix_entropy`` = ``-Σ p ln p / ln N`` with ``p = λ / Σλ`` (spectral entropy normalised to [0, 1]:
  1 for a flat spectrum, 0 for rank one; NaN for ``N = 1`` or a zero matrix);
* ``alpha_weighted`` = ``α · log10(λ_max)`` (WeightWatcher's "alpha-hat", a scale-aware quality metric).

All functions take one 1-D eigenvalue tensor and return Python numbers; NaN/Inf propagate as NaN.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "spectral_norm",
    "frobenius_norm",
    "stable_rank",
    "top_singular_values",
    "matrix_entropy",
    "alpha_weighted",
    "spectral_metrics",
]


def _e(eigs: torch.Tensor) -> torch.Tensor:
    if not isinstance(eigs, torch.Tensor) or eigs.ndim != 1:
        raise ValueError(f"expected a 1-D eigenvalue tensor, got {getattr(eigs, 'shape', type(eigs))}")
    return eigs.detach().to(torch.float64).clamp(min=0)


def spectral_norm(eigs: torch.Tensor) -> float:
    """Largest singular value ``√λ_max``."""
    e = _e(eigs)
    return math.sqrt(float(e.max())) if e.numel() else math.nan


def frobenius_norm(eigs: torch.Tensor) -> float:
    """``‖W‖_F = √Σλ``."""
    return math.sqrt(float(_e(eigs).sum()))


def stable_rank(eigs: torch.Tensor) -> float:
    """``Σλ / λ_max``; NaN for a zero matrix."""
    e = _e(eigs)
    if e.numel() == 0:
        return math.nan
    lmax = float(e.max())
    return float(e.sum()) / lmax if lmax > 0 else math.nan


def top_singular_values(eigs: torch.Tensor, k: int = 5) -> list[float]:
    """The ``k`` largest singular values, descending (fewer if ``N < k``)."""
    if k < 0:
        raise ValueError(f"top_singular_values: k must be >= 0, got {k}")
    e = _e(eigs)
    return [math.sqrt(float(v)) for v in e.sort(descending=True).values[:k]]


def matrix_entropy(eigs: torch.Tensor) -> float:
    """``-Σ p ln p / ln N`` with ``p = λ / Σλ`` (0·ln 0 = 0); NaN for ``N < 2`` or a zero matrix."""
    e = _e(eigs)
    n = e.numel()
    total = float(e.sum())
    if n < 2 or not total > 0 or not math.isfinite(total):
        return math.nan
    p = e / total
    h = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum()
    return float(h) / math.log(n)


def alpha_weighted(alpha: float, eigs: torch.Tensor) -> float:
    """``α · log10(λ_max)``; NaN when α is NaN or the matrix is zero."""
    e = _e(eigs)
    lmax = float(e.max()) if e.numel() else 0.0
    if not lmax > 0 or not math.isfinite(alpha):
        return math.nan
    return alpha * math.log10(lmax)


def spectral_metrics(eigs: torch.Tensor, alpha: float = math.nan, *, top_k: int = 5) -> dict[str, object]:
    """All metrics above in one dict (keys as the function names; ``top_sv`` for the top-k list)."""
    e = _e(eigs)
    if not bool(torch.isfinite(e).all()):
        nan = math.nan
        return {
            "spectral_norm": nan,
            "frobenius_norm": nan,
            "stable_rank": nan,
            "top_sv": [],
            "matrix_entropy": nan,
            "alpha_weighted": nan,
            "lambda_max": nan,
        }
    return {
        "spectral_norm": spectral_norm(e),
        "frobenius_norm": frobenius_norm(e),
        "stable_rank": stable_rank(e),
        "top_sv": top_singular_values(e, top_k),
        "matrix_entropy": matrix_entropy(e),
        "alpha_weighted": alpha_weighted(alpha, e),
        "lambda_max": float(e.max()) if e.numel() else math.nan,
    }
