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
* ``alpha_lag=1`` (:func:`masked_lagged_`, eager and compiled): ``alpha`` from the previous step's sums, so
  nothing written depends on this step's reduction.  Inductor still emits two loops (the reduction reads
  ``m_{t-1}``, which the update loop overwrites, so it is scheduled first): no speed-up on this path; the C
  kernel (:mod:`layerwise.optim._cpu_kernel`) does it in one pass.
* The **eager reference path** (:func:`masked_adamw_`): :func:`masked_stage_` (reads ``g, m, v``;
  writes ``m, v`` and a caller-owned fp32 scratch ``buf = w * u``; returns ``alpha``, density), then
  :func:`masked_finish_` (reads ``p, buf``; writes ``p``).  ``m_{t-1}`` is read before it is
  overwritten, so the ``"previous"`` mask needs no extra state.

The rule itself (the per-element update, the hyper-parameter vector ``h``, ``alpha`` from its sums) is
defined once, in :mod:`layerwise.optim._masked_rule`; this module only arranges it into passes.
"""

from __future__ import annotations

import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _masked_rule as R

__all__ = [
    "adamw_",
    "masked_stage_",
    "masked_finish_",
    "masked_fused_",
    "masked_adamw_",
    "masked_lagged_",
    "RULES",
    "ALPHA_MODES",
    "H_SIZE",
    "PARALLEL_MIN_NUMEL",
    "BUCKET_SIZE",
    "update_many_",
]

RULES = R.RULES
ALPHA_MODES = R.ALPHA_MODES
H_SIZE = R.H_SIZE


def adamw_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor) -> None:
    """Plain AdamW in one pass (``rule="none"``), agreeing with ``torch.optim.AdamW`` to fp32 rounding."""
    _, _, m_new, v_new, u = R.moments(g, m, v, h)
    R.apply_(p, u, h)
    m.copy_(m_new)
    v.copy_(v_new)


def _weighted_stats(
    rule: str, alpha_mode: str, g: Tensor, m: Tensor, v: Tensor, h: Tensor, previous: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(m_t, v_t, w * u, alpha, density, sums)``: the moments, the masked direction, its statistics and
    this step's :func:`~layerwise.optim._masked_rule.partial_sums`; ``alpha`` from ``previous`` sums when
    given (``alpha_lag=1``), else from ``sums`` (the exact rule)."""
    gf, mf, m_new, v_new, u = R.moments(g, m, v, h)
    maskf = R.mask(rule, gf, mf, m_new).to(torch.float32)
    w = R.weight(maskf, h)
    sums = R.partial_sums(m_new, v_new, w, maskf, h)
    alpha, density = R.lagged_alpha(sums, previous, h, alpha_mode)
    return m_new, v_new, w * u, alpha, density, sums


def masked_stage_(
    g: Tensor, m: Tensor, v: Tensor, h: Tensor, buf: Tensor, rule: str, alpha_mode: str
) -> tuple[Tensor, Tensor]:
    """Pass 1 of the eager path: update the moments densely, write ``buf = w * u`` (fp32) and return
    ``(alpha, density)`` as fp32 0-d tensors (``density`` = fraction of coordinates with mask 1; alpha
    in ``[1, alpha_max]``)."""
    m_new, v_new, wu, alpha, density, _ = _weighted_stats(rule, alpha_mode, g, m, v, h)
    buf.copy_(wu)
    m.copy_(m_new)
    v.copy_(v_new)
    return alpha, density


def masked_fused_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, rule: str, alpha_mode: str
) -> tuple[Tensor, Tensor]:
    """The whole masked update as one function (the compiled path): the same arithmetic as
    :func:`masked_stage_` then :func:`masked_finish_`, without the scratch buffer.

    Compiled, it is one kernel with two loops over the tensor: a read-only reduction loop (``alpha``
    and the density from ``g, m, v``) and the update loop, which recomputes ``u`` and the mask and
    writes ``p, m, v`` (inductor orders the writes after the reduction; ``m_{t-1}`` is still in ``m``).
    """
    alpha, density, _ = masked_lagged_(p, g, m, v, h, None, rule, alpha_mode)
    return alpha, density


def masked_lagged_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, previous: Tensor | None, rule: str, alpha_mode: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The whole ``alpha_lag=1`` update of one tensor (the eager reference and the compiled function):
    ``alpha`` from the ``previous`` step's sums (``None``: this step's, the exact rule of a tensor's first
    lagged step), written to ``p, m, v``.  Returns ``(alpha, density, sums)``: the ``alpha`` applied, this
    step's mask density and its sums, to be kept for the next step.

    Compiled with ``previous`` given, nothing written depends on a reduction, yet inductor still emits two
    loops (the reduction loop reads ``m_{t-1}``, which the update loop overwrites, so it is scheduled first;
    see the module docstring); the C kernel does this update in one pass."""
    m_new, v_new, wu, alpha, density, sums = _weighted_stats(rule, alpha_mode, g, m, v, h, previous)
    R.apply_(p, wu, h, alpha)
    m.copy_(m_new)
    v.copy_(v_new)
    return alpha, density, sums


def masked_finish_(p: Tensor, buf: Tensor, h: Tensor, alpha: Tensor) -> None:
    """Pass 2: ``p <- p * (1 - lr * wd) - step_size * alpha * buf`` (written in ``p``'s dtype)."""
    R.apply_(p, buf, h, alpha)


def masked_adamw_(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, rule: str, alpha_mode: str, buf: Tensor | None = None
) -> tuple[Tensor, Tensor] | None:
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
#: the torch.compile backend (tests substitute a failing one to exercise the fallback)
_BACKEND: str | Callable = "inductor"
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
_OPTIONS: dict[bool, dict[str, str | int | bool | Callable[..., Any]]] = {
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


def _many(rule: str, alpha_mode: str, lag: str) -> Callable:
    """The function one compiled call runs over a bucket.  ``lag``: ``""`` (the exact rule),
    ``"first"`` (exact, returning the sums too) or ``"lagged"`` (``alpha`` from the previous sums)."""
    if rule == "none":

        def many(ps, gs, ms, vs, h, prevs):
            for i in range(len(ps)):
                adamw_(ps[i], gs[i], ms[i], vs[i], h)
            return []
    elif lag == "lagged":

        def many(ps, gs, ms, vs, h, prevs):
            return [masked_lagged_(ps[i], gs[i], ms[i], vs[i], h, prevs[i], rule, alpha_mode) for i in range(len(ps))]
    elif lag == "first":

        def many(ps, gs, ms, vs, h, prevs):
            return [masked_lagged_(ps[i], gs[i], ms[i], vs[i], h, None, rule, alpha_mode) for i in range(len(ps))]
    else:

        def many(ps, gs, ms, vs, h, prevs):
            return [masked_fused_(ps[i], gs[i], ms[i], vs[i], h, rule, alpha_mode) for i in range(len(ps))]

    return many


def _compiled_many(rule: str, alpha_mode: str, parallel: bool, k: int, lag: str = "") -> Callable | None:
    key = (rule, alpha_mode, parallel, k, lag)
    if key in _BROKEN:
        return None
    c = _COMPILED.get(key)
    if c is None:
        with _LOCK:
            c = _COMPILED.get(key)
            if c is None:
                # a code object of its own per (variant, threading, bucket length): dynamo's cache and
                # recompile limit are per code object
                tag = f"{rule}_{alpha_mode}_{'parallel' if parallel else 'serial'}_{k}{'_' + lag if lag else ''}"
                target = _clone(_many(rule, alpha_mode, lag), tag)
                if _BACKEND == "inductor":
                    c = torch.compile(target, dynamic=True, fullgraph=True, options=_OPTIONS[parallel])
                else:
                    c = torch.compile(target, dynamic=True, fullgraph=True, backend=_BACKEND)
                _COMPILED[key] = c
    return c


def update_many_(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    h: Tensor,
    rule: str,
    alpha_mode: str,
    *,
    parallel: bool,
    strict: bool = False,
    lag: str = "",
    prevs: list[Tensor] | None = None,
) -> list[Any]:
    """Update up to :data:`BUCKET_SIZE` tensors with one compiled call; returns one
    ``(alpha, density)`` (``None`` for ``rule="none"``) per tensor, or with ``lag`` one
    ``(alpha, density, sums)`` (:func:`masked_lagged_`).

    ``lag``: ``""`` the exact rule; ``"first"`` the exact rule that also returns the sums (a tensor's first
    ``alpha_lag=1`` step); ``"lagged"`` ``alpha`` from ``prevs`` (each tensor's previous sums).

    Every tensor must be flat, contiguous and not a view; all share ``h`` (same step count and
    device).  ``parallel`` picks the multi-threaded kernels (for tensors above
    :data:`PARALLEL_MIN_NUMEL` elements).  Sizes are symbolic and compiled without duck sizing, so
    one compilation per bucket length serves every bucket of that length.

    If *compiling* fails (dynamo or inductor raises: nothing has been written yet) it warns once,
    disables that kernel for the process and runs the eager path, unless ``strict`` (the error
    propagates).  Any other error, e.g. one raised while the compiled kernel runs, propagates: the
    kernel may already have written some tensors, and running the update again would apply it twice.
    """
    if lag not in ("", "first", "lagged"):
        raise ValueError(f"update_many_: unknown lag {lag!r}")
    if lag == "lagged" and (prevs is None or len(prevs) != len(ps)):
        raise ValueError("update_many_: lag='lagged' needs one previous-sums tensor per parameter")
    if rule == "none":
        lag = ""
    k = len(ps)
    key = (rule, alpha_mode, parallel, k, lag)
    fn = None
    try:
        fn = _compiled_many(rule, alpha_mode, parallel, k, lag)  # builds the wrapper only: nothing runs
    except Exception as exc:
        if strict:
            raise
        _mark_broken(key, exc)
    if fn is not None:
        try:
            with _NO_DUCK():
                out = fn(ps, gs, ms, vs, h, prevs if lag == "lagged" else None)
        except _COMPILE_ERRORS as exc:  # dynamo/inductor failed before the graph ran
            if strict:
                raise
            _mark_broken(key, exc)
        else:
            return [None] * k if rule == "none" else list(out)
    if lag:
        return [
            masked_lagged_(p, g, m, v, h, prevs[i] if lag == "lagged" else None, rule, alpha_mode)  # type: ignore[index]
            for i, (p, g, m, v) in enumerate(zip(ps, gs, ms, vs))
        ]
    return [masked_adamw_(p, g, m, v, h, rule, alpha_mode) for p, g, m, v in zip(ps, gs, ms, vs)]


def _compile_errors() -> tuple[type[BaseException], ...]:
    # what torch.compile raises while tracing or compiling (a failing backend, e.g. no C++ compiler for
    # inductor, arrives as BackendCompilerFailed); errors raised by the compiled code itself are not these
    from torch._dynamo import exc as dynamo_exc

    return (dynamo_exc.TorchDynamoException,)


_COMPILE_ERRORS = _compile_errors()


def _NO_DUCK():
    # without duck sizing, tensors of equal size get distinct size symbols: one graph per bucket
    # length instead of one per pattern of equal sizes
    from torch.fx.experimental import _config as fx_config

    return fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]


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
