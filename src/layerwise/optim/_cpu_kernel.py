"""A small C kernel for the masked AdamW update of fp32 CPU tensors, built with the system C compiler
on first use and loaded with :mod:`ctypes`.

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
in cache (the scratch costs a write, its read-for-ownership and a read).  A variant for the ``"density"``
mode that counts the mask from ``g, m`` alone and then runs one masked AdamW pass (9 units, no scratch)
measured no faster here (1.52× vs 1.53× fused AdamW on a 32000 × 512 tensor, slower on small ones), so
every mode uses the scratch.
``rule="none"`` (``masking=False``) is plain AdamW in one pass.  The arithmetic follows torch
AdamW's order of operations; the build uses ``-ffp-contract=off`` so that no fused multiply-adds
change the rounding.  Large tensors are split over threads (``torch.get_num_threads()``): pass-1
partial sums are added in chunk order.

The library is cached in ``$LAYERWISE_CACHE/kernels`` (default ``~/.cache/layerwise/kernels``), keyed
by the source, the flags, the compiler and the CPU's feature flags; it is written to a temporary file
and renamed into place, so concurrent first uses never load a half-written file.  No compiler, a
failed build or ``LAYERWISE_NO_CKERNEL=1`` → :func:`load` returns ``None`` and the optimizers use the
compiled path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["load", "available", "step_", "RULE_CODES", "PARALLEL_MIN_NUMEL"]

RULE_CODES = {"none": 0, "previous": 1, "current": 2, "cautious": 3}
MODE_CODES = {"norm": 0, "density": 1}
#: tensors above this many elements are split over threads when ``torch.get_num_threads() > 1``
PARALLEL_MIN_NUMEL = 1 << 20

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <float.h>

#define BLK 1024

/* h: 0 decay = 1 - lr*wd, 1 = 1 - beta1, 2 = beta2, 3 = 1 - beta2, 4 = eps, 5 = step_size,
      6 = sqrt(1 - beta2^t), 7 = alpha_max, 8 = floor.  acc: sum u^2, sum (w u)^2, mask count (added to). */

#define PASS1(MASK_EXPR)                                                                     \
    for (int64_t b = lo; b < hi; b += BLK) {                                                 \
        const int64_t e = b + BLK < hi ? b + BLK : hi;                                       \
        float su = 0.f, sw = 0.f, sc = 0.f;                                                  \
        _Pragma("omp simd reduction(+:su,sw,sc)")                                             \
        for (int64_t i = b; i < e; i++) {                                                    \
            const float gf = g[i], mf = m[i], vf = v[i];                                     \
            const float mn = mf + b1c * (gf - mf);                                           \
            const float vn = vf * b2 + b2c * (gf * gf);                                      \
            const float u = mn / (sqrtf(vn) / bc2 + eps);                                    \
            const int k = (MASK_EXPR);                                                       \
            const float wu = (k ? 1.f : fl) * u;                                             \
            m[i] = mn; v[i] = vn; s[i] = wu;                                                 \
            su += u * u; sw += wu * wu; sc += (float)k;                                      \
        }                                                                                    \
        uu += su; ww += sw; cnt += sc;                                                       \
    }

void lw_pass1(const float *restrict g, float *restrict m, float *restrict v, float *restrict s,
              int64_t lo, int64_t hi, const float *h, int rule, double *acc) {
    const float b1c = h[1], b2 = h[2], b2c = h[3], eps = h[4], bc2 = h[6], fl = h[8];
    double uu = 0.0, ww = 0.0, cnt = 0.0;
    if (rule == 1) {
        PASS1((mf * gf > 0.f) | (mf == 0.f))
    } else if (rule == 2) {
        PASS1((mn * gf > 0.f) | (mn == 0.f))
    } else {
        PASS1(mn * gf > 0.f)
    }
    acc[0] += uu; acc[1] += ww; acc[2] += cnt;
}

/* alpha and mask density from the accumulated sums; out = (alpha, density); returns step_size * alpha */
float lw_alpha(const double *acc, int64_t n, const float *h, int mode, float *out) {
    const float alpha_max = h[7], fl = h[8];
    const float density = (float)acc[2] / (float)n;
    float alpha;
    if (mode == 0) {
        const float ww = (float)acc[1] > FLT_MIN ? (float)acc[1] : FLT_MIN;
        alpha = sqrtf((float)acc[0] / ww);
    } else {
        const float mean_w = density + fl * (1.f - density);
        alpha = 1.f / (mean_w > 1.f / alpha_max ? mean_w : 1.f / alpha_max);
    }
    alpha = alpha < 1.f ? 1.f : alpha;
    alpha = alpha > alpha_max ? alpha_max : alpha;
    out[0] = alpha; out[1] = density;
    return h[5] * alpha;
}

void lw_pass2(float *restrict p, const float *restrict s, int64_t lo, int64_t hi, float decay, float coef) {
    _Pragma("omp simd")
    for (int64_t i = lo; i < hi; i++) p[i] = p[i] * decay - coef * s[i];
}

void lw_adamw(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
              int64_t lo, int64_t hi, const float *h) {
    const float decay = h[0], b1c = h[1], b2 = h[2], b2c = h[3], eps = h[4], step = h[5], bc2 = h[6];
    _Pragma("omp simd")
    for (int64_t i = lo; i < hi; i++) {
        const float gf = g[i], mf = m[i], vf = v[i];
        const float mn = mf + b1c * (gf - mf);
        const float vn = vf * b2 + b2c * (gf * gf);
        m[i] = mn; v[i] = vn;
        p[i] = p[i] * decay - step * (mn / (sqrtf(vn) / bc2 + eps));
    }
}

/* the whole masked update of one tensor, one thread */
void lw_masked(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
               float *restrict s, int64_t n, const float *h, int rule, int mode, float *out) {
    double acc[3] = {0.0, 0.0, 0.0};
    lw_pass1(g, m, v, s, 0, n, h, rule, acc);
    const float coef = lw_alpha(acc, n, h, mode, out);
    lw_pass2(p, s, 0, n, h[0], coef);
}
"""

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
          "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]

_LIB: ctypes.CDLL | None = None
_TRIED = False
_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_ERROR: str | None = None


def _cache_dir() -> Path:
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


def _build(cc: str) -> Path:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"no C compiler {cc!r}: {exc}") from exc
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS), version, _cpu_flags(), sys.platform]).encode())
    out = _cache_dir() / f"lw_masked_{key.hexdigest()[:20]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "lw_masked.c"
        src.write_text(_SOURCE)
        lib = Path(tmp) / out.name
        r = subprocess.run([cc, *_FLAGS, str(src), "-o", str(lib), "-lm"], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed ({r.returncode}): {r.stderr.strip()[:500]}")
        os.replace(lib, out)  # atomic: a concurrent loader sees the old name or the whole file
    return out


def load() -> ctypes.CDLL | None:
    """The kernel library (built on first use), or ``None`` where it cannot be built or is disabled."""
    global _LIB, _TRIED, _ERROR
    if _TRIED:
        return _LIB
    with _LOCK:
        if _TRIED:
            return _LIB
        try:
            if os.environ.get("LAYERWISE_NO_CKERNEL", "") not in ("", "0"):
                raise RuntimeError("disabled by LAYERWISE_NO_CKERNEL")
            if sys.platform == "win32":
                raise RuntimeError("not built on Windows")
            lib = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"))))
            vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            lib.lw_pass1.argtypes = [vp, vp, vp, vp, i64, i64, vp, i32, vp]
            lib.lw_pass1.restype = None
            lib.lw_alpha.argtypes = [vp, i64, vp, i32, vp]
            lib.lw_alpha.restype = f32
            lib.lw_pass2.argtypes = [vp, vp, i64, i64, f32, f32]
            lib.lw_pass2.restype = None
            lib.lw_adamw.argtypes = [vp, vp, vp, vp, i64, i64, vp]
            lib.lw_adamw.restype = None
            lib.lw_masked.argtypes = [vp, vp, vp, vp, vp, i64, vp, i32, i32, vp]
            lib.lw_masked.restype = None
            _LIB = lib
        except Exception as exc:  # no compiler, build error, load error: the compiled path takes over
            _ERROR = f"{type(exc).__name__}: {exc}"
            _LIB = None
        _TRIED = True
    return _LIB


def available() -> bool:
    return load() is not None


def error() -> str | None:
    """Why the kernel is unavailable (``None`` if it loaded or was not tried yet)."""
    return _ERROR


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers < n:  # type: ignore[attr-defined]
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="layerwise-adamw")
    return _POOL


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    step = -(-n // k)
    step = -(-step // 64) * 64  # whole cache lines per chunk
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None,
          h: torch.Tensor, rule: str, mode: str, out: torch.Tensor | None) -> None:
    """Update one fp32 contiguous CPU tensor in place.  ``s``: fp32 scratch of at least ``p.numel()``
    elements (masked rules); ``out``: a 2-element fp32 tensor that receives ``(alpha, density)``."""
    lib = _LIB
    assert lib is not None, "call load() first"
    n = p.numel()
    pp, gp, mp, vp, hp = p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), h.data_ptr()
    threads = torch.get_num_threads() if n > PARALLEL_MIN_NUMEL else 1
    if rule == "none":
        if threads > 1:
            list(_pool(threads).map(lambda c: lib.lw_adamw(pp, gp, mp, vp, c[0], c[1], hp), _chunks(n, threads)))
        else:
            lib.lw_adamw(pp, gp, mp, vp, 0, n, hp)
        return
    sp, op = s.data_ptr(), out.data_ptr()  # type: ignore[union-attr]
    r, md = RULE_CODES[rule], MODE_CODES[mode]
    if threads == 1:
        lib.lw_masked(pp, gp, mp, vp, sp, n, hp, r, md, op)
        return
    chunks = _chunks(n, threads)
    accs = (ctypes.c_double * (3 * len(chunks)))()
    base = ctypes.addressof(accs)
    pool = _pool(threads)
    list(pool.map(lambda ic: lib.lw_pass1(gp, mp, vp, sp, ic[1][0], ic[1][1], hp, r, base + 24 * ic[0]),
                  enumerate(chunks)))
    total = (ctypes.c_double * 3)(*(sum(accs[3 * i + j] for i in range(len(chunks))) for j in range(3)))
    coef = lib.lw_alpha(ctypes.addressof(total), n, hp, md, op)
    decay = float(h[0])
    list(pool.map(lambda c: lib.lw_pass2(pp, sp, c[0], c[1], decay, coef), chunks))
