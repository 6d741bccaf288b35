"""The AlphaDecay map from heavy-tail exponents α to per-module weight decays (pure functions).

Weight decay follows PyTorch's coupled convention: one step does θ ← θ·(1 − lr·λ) (for decoupled
optimizers) or adds λ·θ to the gradient (torch ``Adam``'s L2); the map only produces the λ values.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["linear_decay_map"]


def linear_decay_map(
    alpha: Sequence[float] | torch.Tensor,
    wd0: float | Sequence[float] | torch.Tensor,
    s1: float = 0.6666,
    s2: float = 3.0,
    *,
    numel: Sequence[int] | torch.Tensor | None = None,
    preserve_mean: bool = False,
) -> torch.Tensor:
    """Global linear map of α over all analysed modules to weight decays (METHODS.md §1).

    With ``α_min``/``α_max`` the extremes of the finite entries of ``alpha``::

        λ_i = wd0_i · (s1 + (s2 − s1) · (α_i − α_min) / (α_max − α_min))

    so λ is increasing in α, ``α_min → s1·wd0`` and ``α_max → s2·wd0``.  Special cases:

    * all finite α equal (or a single module): every module gets ``wd0`` (the authors' ``np.interp``
      would give ``s2·wd0`` there — a bug we do not copy);
    * a non-finite α (NaN/inf: degenerate spectrum, e.g. an all-zero matrix): that module gets ``wd0``
      and is left out of ``α_min``/``α_max``;
    * ``preserve_mean=True``: the finite-α decays are rescaled by one common factor so that the
      parameter-weighted mean ``Σ n_i λ_i / Σ n_i`` over *all* modules equals that of the ``wd0_i``
      (``numel`` gives ``n_i``; required for this option).

    ``wd0`` is a scalar or one base decay per module.  Returns float64 decays on the CPU.
    """
    a = torch.as_tensor(alpha, dtype=torch.float64).detach().cpu().reshape(-1)
    n = a.numel()
    base = torch.as_tensor(wd0, dtype=torch.float64).detach().cpu()
    base = base.expand(n).clone() if base.dim() == 0 else base.reshape(-1).clone()
    if base.numel() != n:
        raise ValueError(f"wd0 has {base.numel()} entries but alpha has {n}")
    if not (math.isfinite(s1) and math.isfinite(s2)) or s1 > s2:
        raise ValueError(f"need finite s1 <= s2, got s1={s1}, s2={s2}")
    finite = torch.isfinite(a)
    out = base.clone()
    if finite.any():
        lo, hi = a[finite].min(), a[finite].max()
        if hi > lo:
            t = (a[finite] - lo) / (hi - lo)
            out[finite] = base[finite] * (s1 + (s2 - s1) * t)
    if preserve_mean:
        if numel is None:
            raise ValueError("preserve_mean=True needs numel (parameter count of each module)")
        w = torch.as_tensor(numel, dtype=torch.float64).reshape(-1)
        if w.numel() != n:
            raise ValueError(f"numel has {w.numel()} entries but alpha has {n}")
        target = (w[finite] * base[finite]).sum()
        current = (w[finite] * out[finite]).sum()
        if current > 0:
            out[finite] = out[finite] * (target / current)
    return out
