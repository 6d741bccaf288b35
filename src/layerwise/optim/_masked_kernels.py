"""Per-tensor update kernels shared by :class:`~layerwise.optim.AlphaAdam` and
:class:`~layerwise.optim.CautiousAdamW`.

A masked update needs a per-tensor statistic (``alpha``) before any parameter can move, so one
tensor is updated in two passes, each a function written in plain torch ops with fp32 arithmetic
whatever the storage dtypes:

* :func:`masked_stage_` (pass 1: reads ``g, m, v``; writes ``m, v`` and ``buf = w * u``) returns the
  per-tensor ``alpha`` and mask density.  ``m_{t-1}`` is read before it is overwritten, element by
  element, so the ``"previous"`` mask needs no extra state;
* :func:`masked_finish_` (pass 2: reads ``p, buf``; writes ``p``) applies decay and the update.

``buf`` is a caller-owned fp32 scratch tensor the size of the parameter (the optimizers keep one,
the size of their largest parameter, and reuse it for every tensor).  Compared with recomputing the
moments in pass 2 this does the square root and division once per element (the step is
compute-bound on CPUs with few threads) for one extra write and read of ``buf``.
``rule="none"`` (plain AdamW) is one pass, :func:`adamw_`.

* The **eager reference path** (:func:`masked_adamw_`) calls these functions as they are;
* the **fast path** (:func:`update_` with ``fast=True``) calls them through
  ``torch.compile(dynamic=True, fullgraph=True)`` on flat 1-D tensors, so one compiled kernel per
  variant serves every tensor shape, and every hyper-parameter arrives in a small fp32 tensor ``h``
  (learning-rate schedules never recompile).

Hyper-parameter vector ``h`` (fp32, on the parameter's device), index: meaning

0. ``decay = 1 - lr * weight_decay`` (PyTorch's coupled decoupled-decay convention)
1. ``1 - beta1`` (the ``lerp`` weight of the first moment)
2. ``beta2``
3. ``1 - beta2``
4. ``eps``
5. ``step_size = lr / (1 - beta1**t)``
6. ``sqrt(1 - beta2**t)``
7. ``alpha_max``
8. ``floor`` (gamma, the update weight of masked coordinates)

Rules (``rule``): ``"none"`` (plain AdamW), ``"previous"`` / ``"current"`` (AlphaAdam: mask from the
sign agreement of ``g`` with ``m_{t-1}`` / ``m_t``; mask = 1 where that momentum is exactly 0),
``"cautious"`` (mask = 1[u * g > 0], no exception at zero: the C-Optim/timm rule).
``alpha_mode``: ``"norm"`` (alpha = ||u|| / ||w * u||) or ``"density"`` (alpha = 1 / mean(w)), where
``w = M + floor * (1 - M)`` is the per-coordinate weight of the update; alpha is clamped to
``[1, alpha_max]``.  Both reduce to the textbook definitions at ``floor = 0``.
"""
from __future__ import annotations

import threading
import types
import warnings
from typing import Callable

import torch
from torch import Tensor

__all__ = ["adamw_", "masked_stage_", "masked_finish_", "masked_adamw_", "update_", "RULES",
           "ALPHA_MODES", "H_SIZE", "PARALLEL_MIN_NUMEL"]

RULES = ("none", "previous", "current", "cautious")
ALPHA_MODES = ("norm", "density")
H_SIZE = 9
_TINY = torch.finfo(torch.float32).tiny


def _moments(g: Tensor, m: Tensor, v: Tensor, h: Tensor):
    """fp32 ``(g, m_{t-1}, m_t, v_t, u)``; ``u = m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)``
    (torch AdamW's order of operations: ``lerp``, ``mul``/``addcmul``, ``sqrt``/div/add)."""
    f32 = torch.float32
    gf = g.to(f32)
    mf = m.to(f32)
    vf = v.to(f32)
    m_new = mf + h[1] * (gf - mf)  # torch's lerp_(g, 1 - beta1) for weights < 0.5
    v_new = vf * h[2] + h[3] * (gf * gf)
    u = m_new / (v_new.sqrt() / h[6] + h[4])
    return gf, mf, m_new, v_new, u


def _mask(rule: str, gf: Tensor, mf: Tensor, m_new: Tensor) -> Tensor:
    if rule == "previous":
        return (mf * gf > 0) | (mf == 0)
    if rule == "current":
        return (m_new * gf > 0) | (m_new == 0)
    if rule == "cautious":  # sign(u) == sign(m_t): the denominator is positive
        return m_new * gf > 0
    raise ValueError(f"unknown rule {rule!r}")  # pragma: no cover - validated by the optimizers


def adamw_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor) -> None:
    """Plain AdamW in one pass (``rule="none"``), agreeing with ``torch.optim.AdamW`` to fp32 rounding."""
    _, _, m_new, v_new, u = _moments(g, m, v, h)
    p.copy_(p.to(torch.float32) * h[0] - h[5] * u)
    m.copy_(m_new)
    v.copy_(v_new)


def masked_stage_(g: Tensor, m: Tensor, v: Tensor, h: Tensor, buf: Tensor, rule: str,
                  alpha_mode: str) -> tuple[Tensor, Tensor]:
    """Pass 1: update the moments densely, write ``buf = w * u`` (fp32) and return ``(alpha, density)``
    as fp32 0-d tensors (``density`` = fraction of coordinates with mask 1; alpha in ``[1, alpha_max]``)."""
    f32 = torch.float32
    gf, mf, m_new, v_new, u = _moments(g, m, v, h)
    mask = _mask(rule, gf, mf, m_new)
    maskf = mask.to(f32)
    floor, alpha_max = h[8], h[7]
    wu = (maskf + floor * (1.0 - maskf)) * u
    density = mask.sum(dtype=torch.int64).to(f32) / mask.numel()
    if alpha_mode == "norm":
        alpha = ((u * u).sum() / (wu * wu).sum().clamp_min(_TINY)).sqrt()
    elif alpha_mode == "density":
        mean_w = density + floor * (1.0 - density)
        alpha = 1.0 / torch.maximum(mean_w, 1.0 / alpha_max)
    else:  # pragma: no cover - validated by the optimizers
        raise ValueError(f"unknown alpha_mode {alpha_mode!r}")
    alpha = torch.minimum(alpha.clamp_min(1.0), alpha_max)
    buf.copy_(wu)
    m.copy_(m_new)
    v.copy_(v_new)
    return alpha, density


def masked_finish_(p: Tensor, buf: Tensor, h: Tensor, alpha: Tensor) -> None:
    """Pass 2: ``p <- p * (1 - lr * wd) - step_size * alpha * buf`` (written in ``p``'s dtype)."""
    p.copy_(p.to(torch.float32) * h[0] - (h[5] * alpha) * buf)


def masked_adamw_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, rule: str, alpha_mode: str,
                  buf: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """The whole update of one tensor, eagerly (the reference path).  ``buf`` (fp32, ``p``'s shape)
    is allocated when not given.  Returns ``(alpha, density)``, or ``None`` for ``rule="none"``."""
    if rule == "none":
        adamw_(p, g, m, v, h)
        return None
    if buf is None:
        buf = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    alpha, density = masked_stage_(g, m, v, h, buf, rule, alpha_mode)
    masked_finish_(p, buf, h, alpha)
    return alpha, density


# One distinct top-level function per variant: dynamo keys its cache (and its recompile limit) on
# the code object, so separate functions keep variants from evicting each other.
def _s_previous_norm(g, m, v, h, buf):
    return masked_stage_(g, m, v, h, buf, "previous", "norm")


def _s_previous_density(g, m, v, h, buf):
    return masked_stage_(g, m, v, h, buf, "previous", "density")


def _s_current_norm(g, m, v, h, buf):
    return masked_stage_(g, m, v, h, buf, "current", "norm")


def _s_current_density(g, m, v, h, buf):
    return masked_stage_(g, m, v, h, buf, "current", "density")


def _s_cautious_norm(g, m, v, h, buf):
    return masked_stage_(g, m, v, h, buf, "cautious", "norm")


def _s_cautious_density(g, m, v, h, buf):
    return masked_stage_(g, m, v, h, buf, "cautious", "density")


def _f_finish(p, buf, h, alpha):
    masked_finish_(p, buf, h, alpha)


def _f_adamw(p, g, m, v, h):
    adamw_(p, g, m, v, h)


_STAGE: dict[tuple[str, str], Callable] = {
    ("previous", "norm"): _s_previous_norm,
    ("previous", "density"): _s_previous_density,
    ("current", "norm"): _s_current_norm,
    ("current", "density"): _s_current_density,
    ("cautious", "norm"): _s_cautious_norm,
    ("cautious", "density"): _s_cautious_density,
}

_COMPILED: dict[tuple[Callable, bool], Callable] = {}
_BROKEN: set[Callable] = set()
_WARNED = False
_LOCK = threading.Lock()

#: tensors with more elements than this use the multi-threaded compiled kernels (torch's own grain
#: size for ``at::parallel_for``); smaller ones use single-threaded kernels, which avoid the cost of
#: an OpenMP region on tiny tensors (large when other processes share the cores).
PARALLEL_MIN_NUMEL = 32768
# Sizes are symbolic, so inductor's own serial/parallel choice would follow whichever tensor was
# compiled first; we fix it instead, one compiled copy per choice.
# ``realize_reads_threshold``: m_t and u are read by many expressions; by default inductor would
# materialise them in fresh full-size temporaries (an allocation, page faults and extra traffic in
# every step) instead of recomputing them in registers.
_OPTIONS = {
    True: {"cpp.dynamic_threads": True, "realize_reads_threshold": 64},
    False: {"cpp.min_chunk_size": 1 << 40, "realize_reads_threshold": 64},
}


def _clone(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object: dynamo caches compiled code per code object."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _compiled(fn: Callable, parallel: bool) -> Callable | None:
    if fn in _BROKEN:
        return None
    key = (fn, parallel)
    c = _COMPILED.get(key)
    if c is None:
        with _LOCK:
            c = _COMPILED.get(key)
            if c is None:
                target = _clone(fn, "parallel" if parallel else "serial")
                c = torch.compile(target, dynamic=True, fullgraph=True, options=_OPTIONS[parallel])
                _COMPILED[key] = c
    return c


def update_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, rule: str, alpha_mode: str,
            buf: Tensor | None, *, fast: bool, strict: bool = False) -> tuple[Tensor, Tensor] | None:
    """Update one tensor in place; returns ``(alpha, density)`` (``None`` for ``rule="none"``).

    ``fast=True`` runs the compiled passes (``p, g, m, v, buf`` must then be flat contiguous tensors
    that are not views, ``buf`` fp32 with ``p``'s numel); if compiling fails it warns once, disables
    that variant for the process and runs the eager path, unless ``strict`` (the error propagates).
    Compilation happens before a kernel writes anything, so the fallback never updates twice.
    """
    if fast:
        parallel = p.numel() > PARALLEL_MIN_NUMEL
        try:
            if rule == "none":
                fn = _compiled(_f_adamw, parallel)
                if fn is not None:
                    fn(p, g, m, v, h)
                    return None
            else:
                stage = _compiled(_STAGE[(rule, alpha_mode)], parallel)
                finish = _compiled(_f_finish, parallel)
                if stage is not None and finish is not None:
                    out = stage(g, m, v, h, buf)
                    _finish(finish, p, buf, h, out[0], rule, alpha_mode, strict)
                    return out
        except Exception as exc:  # raised while compiling: nothing was written yet
            if strict:
                raise
            _mark_broken(rule, alpha_mode, exc)
    return masked_adamw_(p, g, m, v, h, rule, alpha_mode, buf)


def _finish(finish: Callable, p: Tensor, buf: Tensor, h: Tensor, alpha: Tensor, rule: str,
            alpha_mode: str, strict: bool) -> None:
    try:
        finish(p, buf, h, alpha)
    except Exception as exc:
        masked_finish_(p, buf, h, alpha)  # pass 1 already moved the moments: complete the update
        if strict:
            raise
        _mark_broken(rule, alpha_mode, exc)


def _mark_broken(rule: str, alpha_mode: str, exc: BaseException) -> None:
    global _WARNED
    if rule == "none":
        _BROKEN.add(_f_adamw)
    else:
        _BROKEN.add(_STAGE[(rule, alpha_mode)])
        _BROKEN.add(_f_finish)
    if not _WARNED:
        _WARNED = True
        first = str(exc).splitlines()[0] if str(exc) else ""
        warnings.warn(
            f"layerwise: torch.compile of the masked AdamW kernel failed ({type(exc).__name__}: "
            f"{first}); falling back to the eager path (correct but several times slower). "
            "Pass fast=False to silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
