"""The AlphaDecay maps from per-module scores (α, or another spectral metric) to weight decays (pure functions).

Weight decay follows PyTorch's coupled convention: one step does θ ← θ·(1 − lr·λ) (for decoupled
optimizers) or adds λ·θ to the gradient (torch ``Adam``'s L2); the maps only produce the λ values.
Formulas and defaults: ``docs/methods.md`` §1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["linear_decay_map", "assign_decays", "ASSIGNS", "S1", "S2"]

#: the AlphaDecay paper's decay multipliers at the smallest and the largest α (``s1``, ``s2``)
S1, S2 = 0.6666, 3.0

#: the assignment functions :func:`assign_decays` offers
ASSIGNS = ("linear", "sqrt", "log2", "sigmoid")


def _vectors(scores, wd0, field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores`` and ``wd0`` (a scalar or one value per module) as float64 CPU vectors of one length."""
    m = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().reshape(-1)
    base = torch.as_tensor(wd0, dtype=torch.float64).detach().cpu()
    base = base.expand(m.numel()).clone() if base.dim() == 0 else base.reshape(-1).clone()
    if base.numel() != m.numel():
        raise ValueError(f"wd0 has {base.numel()} entries but {field} has {m.numel()}")
    return m, base


def linear_decay_map(
    alpha: Sequence[float] | torch.Tensor,
    wd0: float | Sequence[float] | torch.Tensor,
    s1: float = S1,
    s2: float = S2,
    *,
    numel: Sequence[int] | torch.Tensor | None = None,
    preserve_mean: bool = False,
) -> torch.Tensor:
    """Global linear map of α over all analysed modules to weight decays (``docs/methods.md`` §1).

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
    a, base = _vectors(alpha, wd0, "alpha")
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
        out = _preserve_mean(out, base, finite, numel)
    return out


def _preserve_mean(out: torch.Tensor, base: torch.Tensor, finite: torch.Tensor, numel) -> torch.Tensor:
    """Rescale the finite-score decays by one factor so that ``Σ n_i λ_i / Σ n_i`` equals that of the bases."""
    n = out.numel()
    if numel is None:
        raise ValueError("preserve_mean=True needs numel (parameter count of each module)")
    w = torch.as_tensor(numel, dtype=torch.float64).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"numel has {w.numel()} entries but alpha has {n}")
    out = out.clone()
    target = (w[finite] * base[finite]).sum()
    current = (w[finite] * out[finite]).sum()
    if current > 0:
        out[finite] = out[finite] * (target / current)
    return out


def assign_decays(
    scores: Sequence[float] | torch.Tensor,
    wd0: float | Sequence[float] | torch.Tensor,
    assign: str = "linear",
    s1: float = S1,
    s2: float = S2,
    *,
    blocks: Sequence[object] | None = None,
    slope: float = 4.0,
    eps: float = 1e-8,
    numel: Sequence[int] | torch.Tensor | None = None,
    preserve_mean: bool = False,
) -> torch.Tensor:
    """Per-module weight decays from per-module scores ``m_i`` (α or another metric) by one of the
    assignment functions of the AlphaDecay authors' code (``docs/methods.md`` §1)::

        linear   λ_i = wd0_i · (s1 + (s2 − s1) · (m_i − m_min) / (m_max − m_min))     (:func:`linear_decay_map`)
        sqrt     λ_i = wd0_i · K · √m_i   / Σ_j (√m_j + eps)          K = number of modules scored
        log2     λ_i = wd0_i · K · log2 m_i / Σ_j (log2 m_j + eps)
        sigmoid  λ_i = wd0_i · 2 / (1 + exp(−slope · z_i)),  z_i = (m_i − mean_b m) / (std_b m + eps)

    ``sigmoid`` standardises within each block ``b`` (``blocks``: one hashable label per module, e.g. the
    transformer layer index; population std); a block of one module gets ``wd0``.  ``s1``/``s2`` are used by
    ``linear`` only.  Modules whose score is not finite (or, for ``sqrt``/``log2``, whose score is outside the
    function's domain: m < 0, m <= 0) get ``wd0_i`` and are left out of sums, extremes and block statistics.
    ``preserve_mean`` rescales the scored decays by one factor so the parameter-weighted mean equals the
    bases' (needs ``numel``).  Returns float64 CPU decays.
    """
    if assign not in ASSIGNS:
        raise ValueError(f"assign must be one of {ASSIGNS}, got {assign!r}")
    m, base = _vectors(scores, wd0, "scores")
    n = m.numel()
    if not (math.isfinite(slope) and slope >= 0):
        raise ValueError(f"slope must be finite and >= 0, got {slope!r}")
    if assign == "linear":
        return linear_decay_map(m, base, s1, s2, numel=numel, preserve_mean=preserve_mean)
    finite = torch.isfinite(m)
    out = base.clone()
    if assign == "sqrt":
        finite &= m >= 0
        if finite.any():
            r = m[finite].sqrt()
            out[finite] = base[finite] * int(finite.sum()) * r / (r + eps).sum()
    elif assign == "log2":
        finite &= m > 0
        if finite.any():
            r = torch.log2(m[finite])
            out[finite] = base[finite] * int(finite.sum()) * r / (r + eps).sum()
    else:  # sigmoid, within blocks
        if blocks is None:
            raise ValueError("assign='sigmoid' needs blocks (one block label per module)")
        labels = list(blocks)
        if len(labels) != n:
            raise ValueError(f"blocks has {len(labels)} entries but scores has {n}")
        members: dict[object, list[int]] = {}
        for i, b in enumerate(labels):
            if bool(finite[i]):
                members.setdefault(b, []).append(i)
        for idx in members.values():
            v = m[idx]
            z = (v - v.mean()) / (v.std(correction=0) + eps)
            out[idx] = base[idx] * 2.0 / (1.0 + torch.exp(-slope * z))
    if preserve_mean:
        out = _preserve_mean(out, base, finite, numel)
    return out
