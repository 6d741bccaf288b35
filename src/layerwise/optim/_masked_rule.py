"""The masked AdamW update, defined once.

Every path of :class:`~layerwise.optim.AlphaAdam` and :class:`~layerwise.optim.CautiousAdamW` is built
from the functions here or tested against them:

* the eager reference and the compiled kernels (:mod:`layerwise.optim._masked_kernels`) call
  :func:`moments`, :func:`mask`, :func:`weight`, :func:`partial_sums` and :func:`alpha_from_sums`;
* the sharded (DTensor) step in :mod:`layerwise.optim.alphaadam` calls the same functions on each
  rank's local shard, all-reduces the :func:`partial_sums` and then calls :func:`alpha_from_sums`;
* the C++ kernel (:mod:`layerwise.optim._cpu_kernel`) is native code and cannot call Python: its
  element loop and its ``alpha`` are tested against these functions (``tests/optim/test_cpu_kernel.py``).

All arithmetic is fp32 whatever the storage dtypes.  Hyper-parameters travel in one small fp32 tensor
``h`` (built by :func:`hyper`, on the parameter's device, so learning-rate schedules never recompile a
kernel), index: meaning

0. ``decay = 1 - lr * weight_decay`` (PyTorch's coupled decoupled-decay convention)
1. ``1 - beta1`` (the ``lerp`` weight of the first moment)
2. ``beta2``
3. ``1 - beta2``
4. ``eps``
5. ``step_size = lr / (1 - beta1**t)``
6. ``sqrt(1 - beta2**t)``
7. ``alpha_max``
8. ``floor`` (gamma, the update weight of masked coordinates)

The rule, per element (``rule``): ``"none"`` (plain AdamW), ``"previous"`` / ``"current"`` (AlphaAdam:
mask ``M`` from the sign agreement of ``g`` with ``m_{t-1}`` / ``m_t``; ``M = 1`` where that momentum is
exactly 0), ``"cautious"`` (``M = 1[u * g > 0]``, no exception at zero: the C-Optim/timm rule).  The
update weight is ``w = M + floor * (1 - M)``.  Per tensor (``alpha_mode``): ``"norm"``
(``alpha = ||u|| / ||w * u||``) or ``"density"`` (``alpha = 1 / mean(w)``), clamped to ``[1, alpha_max]``.
Then ``p <- p * decay - step_size * alpha * (w * u)``.

``alpha_lag`` (the optimizers' option): ``0`` (default) is the rule above, the exact one: ``alpha`` of step
``t`` from step ``t``'s own statistics, so every element is visited twice (``alpha`` needs the whole tensor
before any element moves).  ``1`` takes ``alpha`` from the statistics of the tensor's *previous* step
(:func:`lagged_alpha`), so a step is one pass: read ``g, m, v, p`` once, write ``p, m, v`` with this step's
mask and last step's ``alpha``, and add up this step's :func:`partial_sums` for the next step.  Those sums
are per-tensor optimizer state (``state["alpha_sums"]``, 4 fp32 numbers).  A tensor without them (its first
step, or state loaded from an AdamW or ``alpha_lag=0`` checkpoint) takes the exact rule for that step, which
also yields its sums; so the first lagged step is the exact one.  The mask is always this step's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "RULES",
    "ALPHA_MODES",
    "H_SIZE",
    "TINY",
    "hyper",
    "moments",
    "mask",
    "weight",
    "partial_sums",
    "alpha_from_sums",
    "density_from_sums",
    "lagged_alpha",
    "apply_",
]

RULES = ("none", "previous", "current", "cautious")
ALPHA_MODES = ("norm", "density")
H_SIZE = 9
#: the smallest normal fp32 number: the denominator of the norm-mode ``alpha`` is clamped to it
TINY = torch.finfo(torch.float32).tiny


def hyper(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    t: float,
    alpha_max: float,
    floor: float,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The hyper-parameter vector ``h`` of step ``t`` (see the module docstring for its layout)."""
    beta1, beta2 = betas
    return torch.tensor(
        [
            1.0 - lr * weight_decay,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            lr / (1.0 - beta1**t),
            math.sqrt(1.0 - beta2**t),
            alpha_max,
            floor,
        ],
        dtype=torch.float32,
        device=device,
    )


def moments(g: Tensor, m: Tensor, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fp32 ``(g, m_{t-1}, m_t, v_t, u)`` with ``u = m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)``
    (torch AdamW's order of operations: ``lerp``, ``mul``/``addcmul``, ``sqrt``/div/add)."""
    f32 = torch.float32
    gf = g.to(f32)
    mf = m.to(f32)
    vf = v.to(f32)
    m_new = mf + h[1] * (gf - mf)  # torch's lerp_(g, 1 - beta1) for weights < 0.5
    v_new = vf * h[2] + h[3] * (gf * gf)
    u = m_new / (v_new.sqrt() / h[6] + h[4])
    return gf, mf, m_new, v_new, u


def mask(rule: str, gf: Tensor, mf: Tensor, m_new: Tensor) -> Tensor:
    """The boolean mask ``M`` of a masked ``rule`` (``"none"`` has none)."""
    if rule == "previous":
        return (mf * gf > 0) | (mf == 0)
    if rule == "current":
        return (m_new * gf > 0) | (m_new == 0)
    if rule == "cautious":  # sign(u) == sign(m_t): the denominator is positive
        return m_new * gf > 0
    raise ValueError(f"unknown masking rule {rule!r}: expected one of {RULES[1:]}")


def weight(maskf: Tensor, h: Tensor) -> Tensor:
    """The per-coordinate update weight ``w = M + floor * (1 - M)`` (``maskf``: the mask as fp32)."""
    return maskf + h[8] * (1.0 - maskf)


def partial_sums(m_new: Tensor, v_new: Tensor, w: Tensor, maskf: Tensor, h: Tensor) -> Tensor:
    """The sums ``alpha`` needs, as one fp32 tensor ``(sum u'^2, sum (w u')^2, mask count, numel)``.

    Sums over disjoint parts of a tensor (shards) add up to the whole tensor's sums.  ``u'`` is
    ``u * sqrt(1 - beta2^t)`` = ``m_t / (sqrt(v_t) + eps sqrt(1 - beta2^t))``: the ratio
    ``||u|| / ||w u||`` does not see the scale, and this costs one division per element instead of two
    (the compiled kernel recomputes it in its reduction loop)."""
    us = m_new / (v_new.sqrt() + h[6] * h[4])
    wus = w * us
    count = maskf.sum()
    return torch.stack([(us * us).sum(), (wus * wus).sum(), count, torch.full_like(count, maskf.numel())])


def alpha_from_sums(sums: Tensor, h: Tensor, alpha_mode: str) -> tuple[Tensor, Tensor]:
    """``(alpha, density)`` (fp32 0-d tensors) from :func:`partial_sums` (summed over shards).

    ``density`` is the fraction of coordinates with ``M = 1``; ``alpha`` is ``sqrt(sum u^2 / sum (w u)^2)``
    (``"norm"``; a zero denominator gives ``alpha_max``) or ``1 / mean(w)`` (``"density"``, with
    ``mean(w) = density + floor * (1 - density)``), clamped to ``[1, alpha_max]``."""
    uu, ww, _, _ = sums.unbind()
    alpha_max, floor = h[7], h[8]
    density = density_from_sums(sums)
    if alpha_mode == "norm":
        alpha = (uu / ww.clamp_min(TINY)).sqrt()
    elif alpha_mode == "density":
        alpha = 1.0 / torch.maximum(density + floor * (1.0 - density), 1.0 / alpha_max)
    else:
        raise ValueError(f"unknown alpha_mode {alpha_mode!r}: expected one of {ALPHA_MODES}")
    return torch.minimum(alpha.clamp_min(1.0), alpha_max), density


def density_from_sums(sums: Tensor) -> Tensor:
    """The fraction of coordinates with ``M = 1`` (fp32 0-d tensor) from :func:`partial_sums`."""
    return sums[2] / sums[3].clamp_min(1.0)


def lagged_alpha(sums: Tensor, previous: Tensor | None, h: Tensor, alpha_mode: str) -> tuple[Tensor, Tensor]:
    """``(alpha, density)`` of a step under ``alpha_lag=1``: ``alpha`` from the ``previous`` step's
    :func:`partial_sums` (from this step's ``sums`` when there are none: the exact rule), ``density`` of this
    step's mask.  ``previous=None`` is exactly :func:`alpha_from_sums` of ``sums``."""
    if previous is None:
        return alpha_from_sums(sums, h, alpha_mode)
    return alpha_from_sums(previous, h, alpha_mode)[0], density_from_sums(sums)


def apply_(p: Tensor, direction: Tensor, h: Tensor, alpha: Tensor | None = None) -> None:
    """``p <- p * decay - step_size * alpha * direction`` (``alpha=None``: 1), written in ``p``'s dtype."""
    coef = h[5] if alpha is None else h[5] * alpha
    p.copy_(p.to(torch.float32) * h[0] - coef * direction)
