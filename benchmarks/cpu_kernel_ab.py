"""Interleaved A/B of the fp32 CPU kernel behind AlphaAdam/CautiousAdamW's fast path: an older kernel module
(e.g. the ctypes build this repository used before the ``load_inline`` one) against the current one, on the
llama-60m parameter shapes of ``benchmarks/optimizer_step.py``, fused AdamW as the per-round reference.

    git show 21dc499:src/layerwise/optim/_cpu_kernel.py > /tmp/old_ck.py   # the ctypes kernel
    PYTHONPATH=src .venv/bin/python benchmarks/cpu_kernel_ab.py --old /tmp/old_ck.py [--threads 1] [--rounds 15]

Both kernels update the same parameters; each optimizer keeps its own state.  Each round times one step of
every optimizer in a rotated order (``--threads 1``: process CPU time, less sensitive to other processes).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layerwise.optim import _cpu_kernel as new_kernel  # noqa: E402
from layerwise.optim import alphaadam as A  # noqa: E402
from optimizer_step import _pin_malloc, llama60m_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="path of the older kernel module (same load()/step_() API)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every dimension (per-call overhead)")
    args = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("old_kernel", args.old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)  # type: ignore[union-attr]
    if not hasattr(old, "steps_"):  # a one-tensor-per-call kernel: the loop the optimizer used to run

        def steps_(ps, gs, ms, vs, s, h, rule, mode, out):
            for i in range(len(ps)):
                old.step_(ps[i], gs[i], ms[i], vs[i], s, h, rule, mode, None if out is None else out[i])

        old.steps_ = steps_
    torch.set_num_threads(args.threads)
    _pin_malloc()
    loads = {}
    for label, mod in (("old", old), ("new", new_kernel)):
        t0 = time.perf_counter()
        if mod.load() is None:
            raise SystemExit(f"{label} kernel unavailable: {mod.error()}")
        loads[label] = time.perf_counter() - t0
    torch.manual_seed(0)
    params, names = [], []
    for name, shape in llama60m_shapes():
        shape = tuple(max(1, int(s * args.scale)) for s in shape)
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        p.grad = torch.randn(shape) * 1e-3
        params.append(p)
        names.append(name)
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def groups() -> list[dict]:
        return [{"params": params, "param_names": names}]

    opts = {"AdamW fused": (torch.optim.AdamW(groups(), fused=True, **kw), None)}
    makers = [
        ("AlphaAdam norm", lambda: A.AlphaAdam(groups(), **kw)),
        ("AlphaAdam density", lambda: A.AlphaAdam(groups(), alpha_mode="density", **kw)),
        ("AlphaAdam masking=False", lambda: A.AlphaAdam(groups(), masking=False, **kw)),
        ("CautiousAdamW", lambda: A.CautiousAdamW(groups(), **kw)),
    ]
    for label, make in makers:
        opts[f"{label} [old]"] = (make(), old)
        opts[f"{label} [new]"] = (make(), new_kernel)

    def step(name: str) -> None:
        opt, mod = opts[name]
        if mod is not None:
            A.CK = mod  # the optimizer module's kernel for this step
        opt.step()

    for name in opts:  # warm-up (first steps size the scratch buffers)
        step(name)
        step(name)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    times: dict[str, list[float]] = {n: [] for n in opts}
    ratios: dict[str, list[float]] = {n: [] for n in opts}
    order = list(opts)
    for r in range(args.rounds):
        k = r % len(order)
        this: dict[str, float] = {}
        for name in order[k:] + order[:k]:
            t0 = clock()
            step(name)
            this[name] = clock() - t0
        for name, t in this.items():
            times[name].append(t)
            ratios[name].append(t / this["AdamW fused"])
    A.CK = new_kernel
    print(
        f"threads {torch.get_num_threads()}, rounds {args.rounds}, scale {args.scale}, clock {clock.__name__}, "
        f"load average {os.getloadavg()[0]:.1f}; load() with a warm cache: old {loads['old']:.3f} s, "
        f"new {loads['new']:.3f} s"
    )
    print("| optimizer | median step (s) | min step (s) | median ratio to fused AdamW |")
    print("|---|---:|---:|---:|")
    for name in opts:
        print(
            f"| {name} | {statistics.median(times[name]):.4f} | {min(times[name]):.4f} | "
            f"{statistics.median(ratios[name]):.2f}x |"
        )


if __name__ == "__main__":
    main()
