"""A small C++ kernel for the masked AdamW update of fp32 CPU tensors, built on first use with
:func:`torch.utils.cpp_extension.load_inline` and registered as torch operators
(``torch.ops.layerwise_ck.masked_steps_`` / ``adamw_steps_``).

Why: the masked update needs a per-tensor statistic (``alpha``) before any parameter can move.  The
compiled (inductor) path therefore reads every element twice and, since inductor never stores inside
a reduction loop, recomputes ``u = m / (sqrt(v) + eps)`` (a square root and a division per element) in
both loops.  This kernel does what inductor cannot:

* pass 1 reads ``g, m, v`` once, writes ``m_t, v_t`` and the masked direction ``w * u`` to a scratch
  buffer, and accumulates ``sum u^2``, ``sum (w u)^2`` and the mask count (blocked float partial sums,
  added in double);
* pass 2 is ``p <- p * (1 - lr * wd) - step_size * alpha * scratch``.

One square root and one division per element, as in AdamW; for tensors whose scratch stays in cache
pass 2 costs little more than reading and writing ``p``.  The scratch is the optimizer's per-device fp32
buffer, the size of the largest masked parameter.  Memory traffic in units of one fp32 array pass:
fused AdamW 7 (reads ``p, g, m, v``, writes ``p, m, v``); this kernel 10 when the scratch does not stay
in cache.  ``rule="none"`` (``masking=False``) is plain AdamW in one pass.

``alpha_lag=1`` (:func:`steps_` with ``sums``): ``alpha`` comes from the tensor's previous sums, so the same loop
writes ``p`` instead of the scratch and the step is one pass (7 units, fused AdamW's traffic, no
scratch); the sums it accumulates are stored for the next step, in :func:`~layerwise.optim._masked_rule.
partial_sums`'s units.  A tensor's first lagged step (no sums yet) is the exact two-pass update, which
also stores its sums.

The rule is the one of :mod:`layerwise.optim._masked_rule` (the tests compare this kernel's moments,
``alpha``, density and parameters with it); the arithmetic follows torch AdamW's order of operations and
the build uses ``-ffp-contract=off`` so that no fused multiply-adds change the rounding.  Tensors above
:data:`PARALLEL_MIN_NUMEL` elements are split into ``torch.get_num_threads()`` chunks run on torch's own
intra-op thread pool (``at::parallel_for``; no pool of ours to manage); pass-1 partial sums are added
in chunk order, so results do not depend on scheduling.

Build: ``load_inline`` (ninja and a C++ compiler; only the operator-registration headers are included,
about 15 s on one idle core the first time), in ``$LAYERWISE_KERNEL_CACHE/<key>`` (default
``$LAYERWISE_CACHE/kernels``, else ``~/.cache/layerwise/kernels``), the key hashing the source, the flags,
torch's version and the CPU's feature flags (``-march=native``: a cache shared by different machines never
loads a foreign binary).
Concurrent first uses are serialised by torch's build lock.  No compiler, no ninja, a failed build or
``LAYERWISE_NO_CKERNEL=1`` → :func:`load` returns ``None``, :func:`error` says why, and the optimizers
use the compiled path (warning once, unless the kernel was disabled on purpose).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load",
    "available",
    "error",
    "step_",
    "steps_",
    "RULE_CODES",
    "MODE_CODES",
    "PARALLEL_MIN_NUMEL",
]

RULE_CODES = {"none": 0, "previous": 1, "current": 2, "cautious": 3}
MODE_CODES = {"norm": 0, "density": 1}
#: tensors above this many elements are split over threads when ``torch.get_num_threads() > 1``
PARALLEL_MIN_NUMEL = 1 << 20
_NAME = "layerwise_ck"

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLK = 1024;
constexpr int64_t PARALLEL_MIN_NUMEL = 1 << 20;

/* h: 0 decay = 1 - lr*wd, 1 = 1 - beta1, 2 = beta2, 3 = 1 - beta2, 4 = eps, 5 = step_size,
      6 = sqrt(1 - beta2^t), 7 = alpha_max, 8 = floor.  acc: sum u^2, sum (w u)^2, mask count. */

/* One masked loop over [lo, hi): the moments, the mask and w * u of every element, and the sums
   sum u^2, sum (w u)^2, mask count in acc.  LAGGED = false (pass 1 of the exact rule): w * u goes to the
   scratch t.  LAGGED = true (alpha_lag=1, the whole step in one pass): t is the parameter,
   t <- t * decay - coef * w * u with coef = step_size * (last step's alpha). */
#define MASKED_LOOP(MASK_EXPR)                                                               \
    for (int64_t b = lo; b < hi; b += BLK) {                                                 \
        const int64_t e = b + BLK < hi ? b + BLK : hi;                                       \
        float su = 0.f, sw = 0.f, sc = 0.f;                                                  \
        _Pragma("omp simd reduction(+:su,sw,sc)")                                             \
        for (int64_t i = b; i < e; i++) {                                                    \
            const float gf = g[i], mf = m[i], vf = v[i];                                     \
            const float mn = mf + b1c * (gf - mf);                                           \
            const float vn = vf * b2 + b2c * (gf * gf);                                      \
            const float u = mn / (std::sqrt(vn) / bc2 + eps);                                \
            const int k = (MASK_EXPR);                                                       \
            const float wu = (k ? 1.f : fl) * u;                                             \
            m[i] = mn; v[i] = vn;                                                            \
            if (LAGGED) t[i] = t[i] * decay - coef * wu; else t[i] = wu;                     \
            su += u * u; sw += wu * wu; sc += (float)k;                                      \
        }                                                                                    \
        uu += su; ww += sw; cnt += sc;                                                       \
    }

template <bool LAGGED>
void masked_loop(const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                 float* __restrict__ t, int64_t lo, int64_t hi, const float* h, int64_t rule, float coef,
                 double* acc) {
    const float decay = h[0], b1c = h[1], b2 = h[2], b2c = h[3], eps = h[4], bc2 = h[6], fl = h[8];
    double uu = 0.0, ww = 0.0, cnt = 0.0;
    if (rule == 1) {
        MASKED_LOOP((mf * gf > 0.f) | (mf == 0.f))
    } else if (rule == 2) {
        MASKED_LOOP((mn * gf > 0.f) | (mn == 0.f))
    } else {
        MASKED_LOOP(mn * gf > 0.f)
    }
    acc[0] = uu; acc[1] = ww; acc[2] = cnt;
}

/* the sums in the units of layerwise.optim._masked_rule.partial_sums (u' = u / sqrt(1 - beta2^t)), fp32 */
void store_sums(const double* total, int64_t n, const float* h, float* sums) {
    const double bc2sq = (double)h[6] * (double)h[6];
    sums[0] = (float)(total[0] / bc2sq); sums[1] = (float)(total[1] / bc2sq);
    sums[2] = (float)total[2]; sums[3] = (float)n;
}

/* alpha and density from the sums (layerwise.optim._masked_rule.alpha_from_sums); returns step_size * alpha */
float alpha_of(const double* acc, int64_t n, const float* h, int64_t mode, float* out) {
    const float alpha_max = h[7], fl = h[8];
    const float density = (float)acc[2] / (float)(n > 0 ? n : 1);
    float alpha;
    if (mode == 0) {
        const float ww = (float)acc[1] > FLT_MIN ? (float)acc[1] : FLT_MIN;
        alpha = std::sqrt((float)acc[0] / ww);
    } else {
        const float mean_w = density + fl * (1.f - density);
        alpha = 1.f / (mean_w > 1.f / alpha_max ? mean_w : 1.f / alpha_max);
    }
    alpha = alpha < 1.f ? 1.f : alpha;
    alpha = alpha > alpha_max ? alpha_max : alpha;
    out[0] = alpha; out[1] = density;
    return h[5] * alpha;
}

void pass2(float* __restrict__ p, const float* __restrict__ s, int64_t lo, int64_t hi, float decay, float coef) {
    _Pragma("omp simd")
    for (int64_t i = lo; i < hi; i++) p[i] = p[i] * decay - coef * s[i];
}

void adamw(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
           int64_t lo, int64_t hi, const float* h) {
    const float decay = h[0], b1c = h[1], b2 = h[2], b2c = h[3], eps = h[4], step = h[5], bc2 = h[6];
    _Pragma("omp simd")
    for (int64_t i = lo; i < hi; i++) {
        const float gf = g[i], mf = m[i], vf = v[i];
        const float mn = mf + b1c * (gf - mf);
        const float vn = vf * b2 + b2c * (gf * gf);
        m[i] = mn; v[i] = vn;
        p[i] = p[i] * decay - step * (mn / (std::sqrt(vn) / bc2 + eps));
    }
}

/* the chunks of a tensor: one per thread above PARALLEL_MIN_NUMEL, whole cache lines each */
int64_t chunk_size(int64_t n, int64_t* count) {
    const int64_t threads = n > PARALLEL_MIN_NUMEL ? at::get_num_threads() : 1;
    int64_t step = (n + threads - 1) / threads;
    step = (step + 63) / 64 * 64;
    if (step < 1) step = 1;
    *count = (n + step - 1) / step;
    return step;
}

void check(const at::Tensor& t, const at::Tensor& p, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "layerwise C kernel: ", what, " must be a contiguous fp32 CPU tensor");
    TORCH_CHECK(t.numel() >= p.numel(), "layerwise C kernel: ", what, " has ", t.numel(),
                " elements, the parameter ", p.numel());
}

/* the masked loop over a tensor, split into chunks on torch's thread pool above PARALLEL_MIN_NUMEL;
   the chunks' sums are added in chunk order into total (independent of the scheduling) */
template <bool LAGGED>
void masked_chunks(const float* gp, float* mp, float* vp, float* tp, int64_t n, const float* hp, int64_t rule,
                   float coef, double* total) {
    int64_t chunks;
    const int64_t step = chunk_size(n, &chunks);
    total[0] = total[1] = total[2] = 0.0;
    if (chunks <= 1) {
        masked_loop<LAGGED>(gp, mp, vp, tp, 0, n, hp, rule, coef, total);
        return;
    }
    std::vector<double> acc(3 * chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; c++)
            masked_loop<LAGGED>(gp, mp, vp, tp, c * step, std::min(n, (c + 1) * step), hp, rule, coef, &acc[3 * c]);
    });
    for (int64_t c = 0; c < chunks; c++)
        for (int j = 0; j < 3; j++) total[j] += acc[3 * c + j];
}

/* the whole exact masked update of one tensor (pointers checked by the callers): pass 1 into the scratch,
   alpha, pass 2; sums_out (may be null) receives the sums (a tensor's first alpha_lag=1 step) */
void masked_one(float* pp, const float* gp, float* mp, float* vp, float* sp, int64_t n, const float* hp,
                int64_t rule, int64_t mode, float* op, float* sums_out) {
    double total[3];
    masked_chunks<false>(gp, mp, vp, sp, n, hp, rule, 0.f, total);
    const float coef = alpha_of(total, n, hp, mode, op);
    if (sums_out != nullptr) store_sums(total, n, hp, sums_out);
    int64_t chunks;
    const int64_t step = chunk_size(n, &chunks);
    const float decay = hp[0];
    if (chunks <= 1) {
        pass2(pp, sp, 0, n, decay, coef);
        return;
    }
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; c++) pass2(pp, sp, c * step, std::min(n, (c + 1) * step), decay, coef);
    });
}

/* the alpha_lag=1 update of one tensor in one pass: alpha from last step's sums (sums, read), this step's
   sums written back to sums; op receives (alpha applied, this step's density) */
void lagged_one(float* pp, const float* gp, float* mp, float* vp, float* sums, int64_t n, const float* hp,
                int64_t rule, int64_t mode, float* op) {
    const double prev[3] = {sums[0], sums[1], sums[2]};
    const float coef = alpha_of(prev, (int64_t)sums[3], hp, mode, op);
    double total[3];
    masked_chunks<true>(gp, mp, vp, pp, n, hp, rule, coef, total);
    op[1] = (float)total[2] / (float)(n > 0 ? n : 1);
    store_sums(total, n, hp, sums);
}

void adamw_one(float* pp, const float* gp, float* mp, float* vp, int64_t n, const float* hp) {
    int64_t chunks;
    const int64_t step = chunk_size(n, &chunks);
    if (chunks <= 1) {
        adamw(pp, gp, mp, vp, 0, n, hp);
        return;
    }
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; c++) adamw(pp, gp, mp, vp, c * step, std::min(n, (c + 1) * step), hp);
    });
}

void check_h(const at::Tensor& h) {
    TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == 9,
                "layerwise C kernel: h must be 9 contiguous fp32 CPU numbers");
}

/* the checks of every batched call: list lengths, h, each tensor against its parameter; returns the count */
size_t check_batch(at::TensorList ps, at::TensorList gs, at::TensorList ms, at::TensorList vs, const at::Tensor& h) {
    const size_t k = ps.size();
    TORCH_CHECK(gs.size() == k && ms.size() == k && vs.size() == k, "layerwise C kernel: list lengths differ");
    check_h(h);
    for (size_t i = 0; i < k; i++) {
        check(ps[i], ps[i], "p"); check(gs[i], ps[i], "g"); check(ms[i], ps[i], "exp_avg");
        check(vs[i], ps[i], "exp_avg_sq");
    }
    return k;
}

/* masked rules, several tensors sharing h in one call (the optimizer's per-call cost once per group, not per
   tensor); out: (len, 2) rows of (alpha applied, density).  lag 0: the exact rule (sums unused); 1: the exact
   rule, writing each tensor's sums (sum u'^2, sum (w u')^2, count, numel: 4 fp32) to sums[i] (its first
   alpha_lag=1 step); 2: alpha from sums[i] (last step's), one pass, then sums[i] = this step's sums */
void masked_steps_(at::TensorList ps, at::TensorList gs, at::TensorList ms, at::TensorList vs, at::TensorList sums,
                   at::Tensor s, const at::Tensor& h, int64_t rule, int64_t mode, at::Tensor out, int64_t lag) {
    const size_t k = check_batch(ps, gs, ms, vs, h);
    TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.numel() >= (int64_t)(2 * k),
                "layerwise C kernel: out needs 2 contiguous fp32 elements per tensor");
    TORCH_CHECK(rule >= 1 && rule <= 3 && (mode == 0 || mode == 1) && lag >= 0 && lag <= 2,
                "layerwise C kernel: bad rule/mode/lag");
    TORCH_CHECK(lag == 0 || sums.size() == k, "layerwise C kernel: one alpha_sums tensor per parameter needed");
    for (size_t i = 0; i < k; i++) {
        if (lag < 2) check(s, ps[i], "scratch");
        if (lag > 0)
            TORCH_CHECK(sums[i].device().is_cpu() && sums[i].scalar_type() == at::kFloat && sums[i].is_contiguous()
                            && sums[i].numel() == 4,
                        "layerwise C kernel: alpha_sums must be 4 contiguous fp32 CPU numbers");
    }
    const float* hp = h.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (size_t i = 0; i < k; i++) {
        float* sm = lag > 0 ? sums[i].data_ptr<float>() : nullptr;
        if (lag == 2)
            lagged_one(ps[i].data_ptr<float>(), gs[i].data_ptr<float>(), ms[i].data_ptr<float>(),
                       vs[i].data_ptr<float>(), sm, ps[i].numel(), hp, rule, mode, op + 2 * i);
        else
            masked_one(ps[i].data_ptr<float>(), gs[i].data_ptr<float>(), ms[i].data_ptr<float>(),
                       vs[i].data_ptr<float>(), s.data_ptr<float>(), ps[i].numel(), hp, rule, mode, op + 2 * i, sm);
    }
}

void adamw_steps_(at::TensorList ps, at::TensorList gs, at::TensorList ms, at::TensorList vs, const at::Tensor& h) {
    const size_t k = check_batch(ps, gs, ms, vs, h);
    const float* hp = h.data_ptr<float>();
    for (size_t i = 0; i < k; i++)
        adamw_one(ps[i].data_ptr<float>(), gs[i].data_ptr<float>(), ms[i].data_ptr<float>(),
                  vs[i].data_ptr<float>(), ps[i].numel(), hp);
}

/* the sums and (alpha, density) of one tensor without touching it: for the tests of alpha_of */
void alpha_from_sums_(const at::Tensor& sums, int64_t n, const at::Tensor& h, int64_t mode, at::Tensor out) {
    const double acc[3] = {sums[0].item<double>(), sums[1].item<double>(), sums[2].item<double>()};
    alpha_of(acc, n, h.data_ptr<float>(), mode, out.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY(layerwise_ck, lib) {
    lib.def("masked_steps_(Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] m, Tensor(c!)[] v, Tensor(d!)[] sums, "
            "Tensor(e!) s, Tensor h, int rule, int mode, Tensor(f!) out, int lag) -> ()");
    lib.def("adamw_steps_(Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] m, Tensor(c!)[] v, Tensor h) -> ()");
    lib.def("alpha_from_sums_(Tensor sums, int n, Tensor h, int mode, Tensor(a!) out) -> ()");
    lib.impl("masked_steps_", c10::DispatchKey::CPU, TORCH_FN(masked_steps_));
    lib.impl("adamw_steps_", c10::DispatchKey::CPU, TORCH_FN(adamw_steps_));
    lib.impl("alpha_from_sums_", c10::DispatchKey::CPU, TORCH_FN(alpha_from_sums_));
}
"""

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp-simd"]


class _Ops:
    """The loaded operators (overloads resolved once: the cheapest call)."""

    def __init__(self) -> None:
        ns = getattr(torch.ops, _NAME)
        self.masked_steps_ = ns.masked_steps_.default
        self.adamw_steps_ = ns.adamw_steps_.default
        self.alpha_from_sums_ = ns.alpha_from_sums_.default


_OPS: _Ops | None = None
_TRIED = False
_LOCK = threading.Lock()
_ERROR: str | None = None
_WARNED = False


def _cache_dir() -> Path:
    explicit = os.environ.get("LAYERWISE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("LAYERWISE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "layerwise") / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir_() -> Path:
    """Where this machine's build of the kernel lives (the key: source, flags, torch, CPU features)."""
    key = hashlib.sha256(
        "\0".join([_SOURCE, " ".join(_FLAGS), torch.__version__, _cpu_flags(), sys.platform]).encode()
    ).hexdigest()[:20]
    return _cache_dir() / f"{_NAME}_{key}"


def _build() -> None:
    import shutil

    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} found (set CXX to one)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (torch.utils.cpp_extension needs it: pip install ninja)")

    build_dir = build_dir_()
    build_dir.mkdir(parents=True, exist_ok=True)
    # is_python_module=False: the library is loaded into the process and registers torch.ops.layerwise_ck
    cpp_extension.load_inline(
        _NAME,
        cpp_sources=_SOURCE,
        extra_cflags=_FLAGS,
        build_directory=str(build_dir),
        is_python_module=False,
        no_implicit_headers=True,
        verbose=False,
    )


def _registered() -> bool:
    """Whether this process has the operators already (loaded from another cache directory, say)."""
    return hasattr(getattr(torch.ops, _NAME), "masked_steps_")


def load() -> Any:
    """The kernel's operators (built on first use), or ``None`` where they cannot be built or are disabled
    (:func:`error` then says why)."""
    global _OPS, _TRIED, _ERROR
    if _TRIED:
        return _OPS
    with _LOCK:
        if _TRIED:
            return _OPS
        try:
            if os.environ.get("LAYERWISE_NO_CKERNEL", "") not in ("", "0"):
                raise RuntimeError("disabled by LAYERWISE_NO_CKERNEL")
            if sys.platform == "win32":
                raise RuntimeError("not built on Windows")
            if not _registered():
                _build()
            _OPS = _Ops()
        except Exception as exc:  # no compiler or ninja, build error, load error: the compiled path takes over
            lines = str(exc).strip().splitlines()
            # a failed build's message is the whole compiler log: keep its first error line
            detail = next((ln.strip() for ln in lines if "error:" in ln), lines[0] if lines else "")
            _ERROR = f"{type(exc).__name__}: {detail}"[:500]
            _OPS = None
        _TRIED = True
    return _OPS


def available() -> bool:
    return load() is not None


def error() -> str | None:
    """Why the kernel is unavailable (``None`` if it loaded or was not tried yet)."""
    return _ERROR


def warn_unavailable() -> None:
    """Warn once per process that the kernel is unavailable and why (not when disabled on purpose)."""
    global _WARNED
    if _WARNED or _ERROR is None or "LAYERWISE_NO_CKERNEL" in _ERROR:
        return
    _WARNED = True
    warnings.warn(
        f"layerwise: the C++ kernel for fp32 CPU AlphaAdam/CautiousAdamW steps is unavailable "
        f"({_ERROR}); using the compiled path instead (correct, slower for masked updates). "
        "Set LAYERWISE_NO_CKERNEL=1 or pass cpu_kernel=False to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )


def _ops() -> _Ops:
    ops = _OPS
    if ops is None:
        raise RuntimeError(f"layerwise C kernel not loaded ({_ERROR or 'call load() first'})")
    return ops


def step_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor | None,
    h: torch.Tensor,
    rule: str,
    mode: str,
    out: torch.Tensor | None,
) -> None:
    """Update one fp32 contiguous CPU tensor in place (:func:`steps_` of one tensor).  ``s``: fp32 scratch of
    at least ``p.numel()`` elements (masked rules); ``out``: a 2-element fp32 tensor that receives
    ``(alpha, density)``."""
    steps_([p], [g], [m], [v], s, h, rule, mode, None if out is None else out.view(1, 2))


def steps_(
    ps: list[torch.Tensor],
    gs: list[torch.Tensor],
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    s: torch.Tensor | None,
    h: torch.Tensor,
    rule: str,
    mode: str,
    out: torch.Tensor | None,
    sums: list[torch.Tensor] | None = None,
    first: bool = False,
) -> None:
    """Update several fp32 contiguous CPU tensors sharing ``h`` in place, in one call.  ``s``: fp32 scratch of
    at least the largest tensor's size (masked rules; unused by a lagged step); ``out``: a contiguous
    ``(len(ps), 2)`` fp32 tensor that receives the rows (``alpha`` applied, density).

    ``sums`` (masked rules, ``alpha_lag=1``): each tensor's ``alpha_sums`` (4 fp32 numbers, in the units of
    :func:`layerwise.optim._masked_rule.partial_sums`), read as last step's and overwritten with this step's:
    one pass per tensor.  With ``first`` the tensors have no previous sums: the exact rule (two passes through
    ``s``) also writes them."""
    if rule == "none":
        _ops().adamw_steps_(ps, gs, ms, vs, h)
        return
    lag = 0 if sums is None else (1 if first else 2)
    _ops().masked_steps_(ps, gs, ms, vs, sums or [], s, h, RULE_CODES[rule], MODE_CODES[mode], out, lag)
