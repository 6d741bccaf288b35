"""Independent float64 NumPy references for the spectral tests (no code shared with the library)."""

from __future__ import annotations

import numpy as np


def np_hill(lam) -> float:
    x = np.sort(np.asarray(lam, dtype=np.float64))
    n_all = x.size
    i = n_all // 2
    xmin = x[i]
    s = float(np.sum(np.log(x[i:] / xmin)))
    return 1.0 + (n_all - i) / s


def np_ks_dist(tail, xmin, alpha) -> float:
    t = np.sort(np.asarray(tail, dtype=np.float64))
    n = t.size
    cdf = 1.0 - (t / xmin) ** (1.0 - alpha)
    best = 0.0
    for m in range(n):
        best = max(best, (m + 1) / n - cdf[m], cdf[m] - m / n)
    return best


def np_ks_search(lam, min_tail=10, lo=None, hi=None):
    """Brute-force Clauset search: a Python loop over distinct candidate xmin values."""
    x = np.sort(np.asarray(lam, dtype=np.float64))
    best = (np.inf, np.nan, np.nan, 0)
    for xm in np.unique(x[x > 0]):
        if lo is not None and xm < lo or hi is not None and xm > hi:
            continue
        tail = x[x >= xm]
        if tail.size < min_tail:
            continue
        s = np.sum(np.log(tail / xm))
        if s <= 0:
            continue
        a = 1.0 + tail.size / s
        d = np_ks_dist(tail, xm, a)
        if d < best[0]:
            best = (d, a, xm, tail.size)
    d, a, xm, n = best
    return a, xm, d, n


def planted(n_rows: int, n_cols: int, alpha: float, seed: int):
    """W = U diag(σ) Vᵀ with σ² i.i.d. Pareto(xmin=1, density ∝ λ^-alpha); U, V orthonormal (torch QR, float64)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = min(n_rows, n_cols)
    u, _ = torch.linalg.qr(torch.randn(n_rows, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_cols, n, generator=g, dtype=torch.float64))
    lam = (1.0 - torch.rand(n, generator=g, dtype=torch.float64)) ** (-1.0 / (alpha - 1.0))
    return ((u * lam.sqrt()) @ v.T).numpy(), np.sort(lam.numpy())
