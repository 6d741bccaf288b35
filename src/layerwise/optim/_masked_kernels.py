"""Per-tensor update kernels shared by :class:`~layerwise.optim.AlphaAdam` and
:class:`~layerwise.optim.CautiousAdamW`.

A masked update needs a per-tensor statistic (``alpha``) before any parameter can move, so every
element is visited twice.  All functions are plain torch ops with fp32 arithmetic whatever the
storage dtypes.

* The **compiled path** (:func:`update_many_`): :func:`masked_fused_` is one
  function, compiled to one kernel with two loops: a read-only reduction loop (``g, m, v`` ->
  ``alpha``, density) and the update loop, which recomputes ``u`` and the mask and writes
  ``p, m, v``.  No scratch memory.  (Inductor never puts stores in a reduction loop, so a design
  that writes ``w * u`` to a buffer in pass 1 costs a third loop; materialising ``u`` costs
  full-size temporaries.  Recomputing is the fastest of the three on CPUs.)  ``rule="none"``
  (plain AdamW) is one loop, :func:`adamw_`.  Functions are compiled with
  ``torch.compile(dynamic=True, fullgraph=True)`` on flat 1-D tensors, so one compilation serves
  every shape; every hyper-parameter arrives in a small fp32 tensor ``h`` (learning-rate schedules
  never recompile); up to :data:`BUCKET_SIZE` tensors share one compiled call (a call costs tens
  of microseconds of Python and guard overhead).
* The **eager reference path** (:func:`masked_adamw_`): :func:`masked_stage_` (reads ``g, m, v``;
  writes ``m, v`` and a caller-owned fp32 scratch ``buf = w * u``; returns ``alpha``, density), then
  :func:`masked_finish_` (reads ``p, buf``; writes ``p``).  ``m_{t-1}`` is read before it is
  overwritten, so the ``"previous"`` mask needs no extra state.

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

__all__ = ["adamw_", "masked_stage_", "masked_finish_", "masked_fused_", "masked_adamw_", "RULES",
           "ALPHA_MODES", "H_SIZE", "PARALLEL_MIN_NUMEL", "BUCKET_SIZE", "update_many_"]

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


def _weighted_stats(rule: str, alpha_mode: str, gf: Tensor, mf: Tensor, m_new: Tensor, v_new: Tensor,
                    u: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(w * u, alpha, density)``: the masked update direction and its per-tensor statistics."""
    f32 = torch.float32
    mask = _mask(rule, gf, mf, m_new)
    maskf = mask.to(f32)
    floor, alpha_max = h[8], h[7]
    w = maskf + floor * (1.0 - maskf)
    wu = w * u
    density = mask.sum(dtype=torch.int64).to(f32) / mask.numel()
    if alpha_mode == "norm":
        # ||u|| / ||w u|| is invariant to scaling u, so the statistic uses
        # u' = u / sqrt(1 - beta2^t) = m_t / (sqrt(v_t) + eps sqrt(1 - beta2^t)): one division per
        # element instead of two (it is recomputed in the compiled kernel's reduction loop)
        us = m_new / (v_new.sqrt() + h[6] * h[4])
        wus = w * us
        alpha = ((us * us).sum() / (wus * wus).sum().clamp_min(_TINY)).sqrt()
    elif alpha_mode == "density":
        mean_w = density + floor * (1.0 - density)
        alpha = 1.0 / torch.maximum(mean_w, 1.0 / alpha_max)
    else:  # pragma: no cover - validated by the optimizers
        raise ValueError(f"unknown alpha_mode {alpha_mode!r}")
    alpha = torch.minimum(alpha.clamp_min(1.0), alpha_max)
    return wu, alpha, density


def masked_stage_(g: Tensor, m: Tensor, v: Tensor, h: Tensor, buf: Tensor, rule: str,
                  alpha_mode: str) -> tuple[Tensor, Tensor]:
    """Pass 1 of the eager path: update the moments densely, write ``buf = w * u`` (fp32) and return
    ``(alpha, density)`` as fp32 0-d tensors (``density`` = fraction of coordinates with mask 1; alpha
    in ``[1, alpha_max]``)."""
    gf, mf, m_new, v_new, u = _moments(g, m, v, h)
    wu, alpha, density = _weighted_stats(rule, alpha_mode, gf, mf, m_new, v_new, u, h)
    buf.copy_(wu)
    m.copy_(m_new)
    v.copy_(v_new)
    return alpha, density


def masked_fused_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, rule: str,
                  alpha_mode: str) -> tuple[Tensor, Tensor]:
    """The whole masked update as one function (the compiled path): the same arithmetic as
    :func:`masked_stage_` then :func:`masked_finish_`, without the scratch buffer.

    Compiled, it is one kernel with two loops over the tensor: a read-only reduction loop (``alpha``
    and the density from ``g, m, v``) and the update loop, which recomputes ``u`` and the mask and
    writes ``p, m, v`` (inductor orders the writes after the reduction; ``m_{t-1}`` is still in ``m``).
    """
    gf, mf, m_new, v_new, u = _moments(g, m, v, h)
    wu, alpha, density = _weighted_stats(rule, alpha_mode, gf, mf, m_new, v_new, u, h)
    p.copy_(p.to(torch.float32) * h[0] - (h[5] * alpha) * wu)
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


_COMPILED: dict[tuple, Callable] = {}
_BROKEN: set = set()
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


#: at most this many tensors go through one compiled call (:func:`update_many_`): one call costs
#: tens of microseconds of Python/guard overhead, as much as updating a 100k-element tensor, so small
#: and medium tensors are batched; larger buckets would mean longer compiles for little gain.
#: A power of two: the optimizers split leftover buckets into power-of-two lengths, so at most
#: ``log2(BUCKET_SIZE) + 1`` lengths are compiled per variant and threading choice.
BUCKET_SIZE = 8


def _many(rule: str, alpha_mode: str) -> Callable:
    if rule == "none":
        def many(ps, gs, ms, vs, h):
            for i in range(len(ps)):
                adamw_(ps[i], gs[i], ms[i], vs[i], h)
            return []
    else:
        def many(ps, gs, ms, vs, h):
            return [masked_fused_(ps[i], gs[i], ms[i], vs[i], h, rule, alpha_mode) for i in range(len(ps))]
    return many


def _compiled_many(rule: str, alpha_mode: str, parallel: bool, k: int) -> Callable | None:
    key = (rule, alpha_mode, parallel, k)
    if key in _BROKEN:
        return None
    c = _COMPILED.get(key)
    if c is None:
        with _LOCK:
            c = _COMPILED.get(key)
            if c is None:
                # a code object of its own per (variant, threading, bucket length): dynamo's cache and
                # recompile limit are per code object
                tag = f"{rule}_{alpha_mode}_{'parallel' if parallel else 'serial'}_{k}"
                target = _clone(_many(rule, alpha_mode), tag)
                c = torch.compile(target, dynamic=True, fullgraph=True, options=_OPTIONS[parallel])
                _COMPILED[key] = c
    return c


def update_many_(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], h: Tensor,
                 rule: str, alpha_mode: str, *, parallel: bool,
                 strict: bool = False) -> list[tuple[Tensor, Tensor] | None]:
    """Update up to :data:`BUCKET_SIZE` tensors with one compiled call; returns one
    ``(alpha, density)`` (``None`` for ``rule="none"``) per tensor.

    Every tensor must be flat, contiguous and not a view; all share ``h`` (same step count and
    device).  ``parallel`` picks the multi-threaded kernels (for tensors above
    :data:`PARALLEL_MIN_NUMEL` elements).  Sizes are symbolic and compiled without duck sizing, so
    one compilation per bucket length serves every bucket of that length.  If compiling fails (before
    anything is written) it warns once, disables that kernel for the process and runs the eager path,
    unless ``strict`` (the error propagates).
    """
    k = len(ps)
    key = (rule, alpha_mode, parallel, k)
    try:
        fn = _compiled_many(rule, alpha_mode, parallel, k)
        if fn is not None:
            with _NO_DUCK():
                out = fn(ps, gs, ms, vs, h)
            return [None] * k if rule == "none" else list(out)
    except Exception as exc:  # raised while compiling: nothing was written yet
        if strict:
            raise
        _mark_broken(key, exc)
    return [masked_adamw_(p, g, m, v, h, rule, alpha_mode) for p, g, m, v in zip(ps, gs, ms, vs)]


def _NO_DUCK():
    # without duck sizing, tensors of equal size get distinct size symbols: one graph per bucket
    # length instead of one per pattern of equal sizes
    from torch.fx.experimental import _config as fx_config
    return fx_config.patch(use_duck_shape=False)


def _mark_broken(key, exc: BaseException) -> None:
    global _WARNED
    _BROKEN.add(key)
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
