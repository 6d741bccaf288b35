"""Masked-update kernel cost by tensor size, against fused AdamW (one thread, interleaved).

For each size, enough tensors to make ~16M elements are updated by ``torch.optim.AdamW(fused=True)`` and by the
C kernel of ``layerwise.optim._cpu_kernel`` (AlphaAdam norm rule, the same with ``alpha_lag=1``: one pass,
Cautious rule, plain AdamW); medians of the per-round ratios.  Shows where the second pass is cheap (scratch
still in cache) and where it is not.

    PYTHONPATH=src python benchmarks/masked_kernel_sizes.py [--rounds 11]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from layerwise.optim import _cpu_kernel as CK


def _one_by_one(lists, scratch, h, rule, mode, out) -> None:
    """One C call per tensor (what the optimizer did per tensor before batching)."""
    for p, g, m, v in zip(*lists):
        CK.step_(p, g, m, v, scratch, h, rule, mode, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--total", type=int, default=16_000_000, help="elements per timed call")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if CK.load() is None:
        raise SystemExit(f"C kernel unavailable: {CK.error()}")
    h = torch.tensor([1 - 1e-4, 0.1, 0.95, 0.05, 1e-8, 1e-3, 0.5, 10.0, 0.0])
    print(
        "| tensor | count | AlphaAdam norm / fused | AlphaAdam norm alpha_lag=1 / fused | Cautious / fused "
        "| plain AdamW (C) / fused |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for shape in [(32000, 512), (1376, 512), (512, 512), (128, 512)]:
        n = shape[0] * shape[1]
        reps = max(1, args.total // n)
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(n, generator=gen) * 0.02 for _ in range(reps)]
        gs = [torch.randn(n, generator=gen) * 1e-3 for _ in range(reps)]
        ms = [torch.randn(n, generator=gen) * 1e-4 for _ in range(reps)]
        vs = [torch.rand(n, generator=gen) * 1e-6 for _ in range(reps)]
        params = [torch.nn.Parameter(p.clone()) for p in ps]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
        fused.step()
        scratch, out = torch.empty(n), torch.empty(2)

        lists = (ps, gs, ms, vs)
        sums = [torch.zeros(4) for _ in range(reps)]
        rows = torch.empty(reps, 2)
        CK.steps_(*lists, scratch, h, "previous", "norm", rows, sums, True)  # the exact first step
        fns = {
            "fused": fused.step,
            "norm": functools.partial(_one_by_one, lists, scratch, h, "previous", "norm", out),
            "lagged": functools.partial(CK.steps_, *lists, scratch, h, "previous", "norm", rows, sums, False),
            "cautious": functools.partial(_one_by_one, lists, scratch, h, "cautious", "density", out),
            "adamw": functools.partial(_one_by_one, lists, scratch, h, "none", "norm", out),
        }
        for f in fns.values():
            f()
        ratios: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.rounds):
            t = {}
            for k in list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]:
                t0 = time.perf_counter()
                fns[k]()
                t[k] = time.perf_counter() - t0
            for k in fns:
                ratios[k].append(t[k] / t["fused"])
        med = {k: statistics.median(v) for k, v in ratios.items()}
        print(
            f"| {shape[0]}×{shape[1]} | {reps} | {med['norm']:.2f}x | {med['lagged']:.2f}x | {med['cautious']:.2f}x "
            f"| {med['adamw']:.2f}x |"
        )


if __name__ == "__main__":
    main()
