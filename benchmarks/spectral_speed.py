"""Speed and agreement of layerwise.spectral on the 56 block matrices of a llama-60m-shaped model.

Shapes (8 layers): q/k/v/o 512x512, gate/up 1376x512, down 512x1376.  Two weight variants: random init
N(0, 0.02^2) and a heavy-tailed one (Student-t entries, 3 degrees of freedom, scaled to std 0.02).

Methods:
  ours        layerwise.spectral.analyze(model)  (full report: batched Gram eigvalsh + Hill + KS distance + metrics)
  ours-core   gram_eigvals + hill_alpha only
  ours-f2py   analyze(model) with SciPy's public f2py wrapper scipy.linalg.lapack.ssyevr over the same threads
              instead of the GIL-free ctypes call of ?syevr (the ctypes binding must beat this by >= 1.3x)
  ours-torch  analyze(model, solver="torch")  (torch.linalg.eigvalsh = MKL ?syevd, one batched call)
  gram-only   the Gram products alone (the floor of the GIL-free path, with the eigensolvers on 2 threads)
  (a) svd     the AlphaDecay authors' way: torch.linalg.svdvals per matrix, square, sort, Hill (our own code)
  (b) ww      WeightWatcher 0.7.7 WeightWatcher(model).analyze()  (if installed; benchmark-only dependency)

Every (method, round) runs in a FRESH process, in a random order per round, so no method inherits process
state from another (the old in-process loop let analyze(solver="torch") slow the later svdvals baseline ~3x).
Each worker also times a fixed probe (svdvals of 8 of the matrices) before and after its method: the
"interference" column is after/before, median over rounds; ~1.0 means the method leaves nothing behind.

Run:  PYTHONPATH=src .venv/bin/python benchmarks/spectral_speed.py [--rounds 5] [--reps 3] [--ww]
      (--small: 2 layers of 128/344 shapes, for a quick check of the script)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from layerwise.spectral import analyze, gram_eigvals, hill_alpha


class Block(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, n, nn.Linear(d, d, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, f, bias=False)
        self.mlp.up_proj = nn.Linear(d, f, bias=False)
        self.mlp.down_proj = nn.Linear(f, d, bias=False)


class Llama60mShapes(nn.Module):
    def __init__(self, layers: int = 8, d: int = 512, f: int = 1376):
        super().__init__()
        self.layers = nn.ModuleList([Block(d, f) for _ in range(layers)])


def build(variant: str, seed: int = 0, small: bool = False) -> Llama60mShapes:
    g = torch.Generator().manual_seed(seed)
    m = Llama60mShapes(2, 128, 344) if small else Llama60mShapes()
    with torch.no_grad():
        for p in m.parameters():
            if variant == "init":
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:  # Student-t(3): variance 3, rescale to std 0.02
                z = torch.randn(p.shape, generator=g)
                chi2 = (torch.randn((3, *p.shape), generator=g) ** 2).sum(0)
                p.copy_(z / (chi2 / 3).sqrt() * 0.02 / 3**0.5)
    return m


def authors_way(model: nn.Module) -> dict[str, float]:
    """One SVD per matrix, eigenvalues = squared singular values, then the median-threshold Hill estimator."""
    out = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                s = torch.linalg.svdvals(mod.weight.float())
                e = torch.sort(s * s).values
                n_all = e.numel()
                i = n_all // 2
                xmin = e[i]
                out[f"{name}.weight"] = float(1 + (n_all - i) / torch.log(e[i:] / xmin).sum())
    return out


def ours_core(model: nn.Module) -> torch.Tensor:
    ws = [mod.weight for mod in model.modules() if isinstance(mod, nn.Linear)]
    return hill_alpha(gram_eigvals(ws))


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    r = fn(*a, **k)
    return time.perf_counter() - t0, r


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [mod.weight for mod in model.modules() if isinstance(mod, nn.Linear)]


def _f2py_analyze(model: nn.Module):
    """analyze() with the ctypes ?syevr disabled: gram_eigvals then falls back to SciPy's f2py wrapper."""
    from layerwise.spectral import eig

    saved = dict(eig._SYEVR)
    eig._SYEVR[torch.float32] = None
    try:
        return analyze(model, solver="lapack")
    finally:
        eig._SYEVR.clear()
        eig._SYEVR.update(saved)


def _gram_only(model: nn.Module):
    from layerwise.spectral import gram_matrices

    return gram_matrices(_linear_weights(model))


def _ww(model: nn.Module):
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return weightwatcher.WeightWatcher(model=model).analyze()


METHODS = {
    "ours": lambda m: analyze(m),
    "ours-core": ours_core,
    "ours-f2py": _f2py_analyze,
    "ours-torch": lambda m: analyze(m, solver="torch"),
    "gram-only": _gram_only,
    "(a) svd": authors_way,
    "(b) ww": _ww,
}


def _probe(model: nn.Module) -> float:
    ws = _linear_weights(model)[:8]
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        for w in ws:
            torch.linalg.svdvals(w.float())
        ts.append(time.perf_counter() - t0)
    return min(ts)


def worker(method: str, variant: str, reps: int, small: bool) -> None:
    """One method in this (fresh) process: warm-up, probe, ``reps`` timed calls, probe again; JSON on stdout."""
    model = build(variant, small=small)
    fn = METHODS[method]
    authors_way(model)  # the same warm-up for everyone (allocator, MKL/OpenMP start-up)
    analyze(model)
    before = _probe(model)
    fn(model)  # warm-up of the method itself
    ts = [timed(fn, model)[0] for _ in range(reps)]
    after = _probe(model)
    out = {"method": method, "variant": variant, "time": statistics.median(ts), "interference": after / before}
    if method in ("ours", "ours-f2py", "ours-torch"):
        rep = fn(model)
        ref = authors_way(model)
        out["max_rel_alpha"] = max(abs(r["alpha"] - ref[r["name"]]) / abs(ref[r["name"]]) for r in rep.rows)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="timed calls per worker process (median)")
    ap.add_argument("--ww", action="store_true", help="also time WeightWatcher (pip install weightwatcher==0.7.7)")
    ap.add_argument("--variants", default="init,heavy")
    ap.add_argument("--methods", default=None, help="comma list (default: all but (b) ww)")
    ap.add_argument("--small", action="store_true", help="tiny shapes: checks the script, not a benchmark")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random order")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.reps, args.small)
        return
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if m != "(b) ww"]
    if args.ww and "(b) ww" not in methods:
        methods.append("(b) ww")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r} (known: {', '.join(METHODS)})")
    rng = random.Random(args.seed)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"{platform.processor() or platform.machine()}, load avg at start {os.getloadavg()}",
        flush=True,
    )
    res: dict[tuple[str, str], list[dict]] = {}
    loads = []
    for r in range(args.rounds):
        jobs = [(m, v) for v in args.variants.split(",") for m in methods]
        rng.shuffle(jobs)
        for m, v in jobs:
            cmd = [sys.executable, __file__, "--worker", m, v, "--reps", str(args.reps)] + (
                ["--small"] if args.small else []
            )
            p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                raise SystemExit(f"worker {m}/{v} failed:\n{p.stderr[-3000:]}")
            res.setdefault((m, v), []).append(json.loads(line[7:]))
        loads.append(os.getloadavg()[0])
        print(f"round {r} done, load avg {loads[-1]:.2f}", flush=True)
    print(
        f"\nload avg (1 min) over rounds: median {statistics.median(loads):.2f} (min {min(loads):.2f}, "
        f"max {max(loads):.2f})"
    )
    for v in args.variants.split(","):
        med = {m: statistics.median(x["time"] for x in res[(m, v)]) for m in methods}
        print(f"\n## variant {v}: medians over {args.rounds} fresh-process rounds x {args.reps} reps")
        print("| method | time | (a)/this | interference (probe after/before) | max rel. α diff vs (a) |")
        print("|---|---|---|---|---|")
        for m in methods:
            inter = statistics.median(x["interference"] for x in res[(m, v)])
            rel = max((x.get("max_rel_alpha", float("nan")) for x in res[(m, v)]), default=float("nan"))
            print(
                f"| {m} | {med[m] * 1000:.1f} ms | {med['(a) svd'] / med[m]:.2f}x | {inter:.2f} | "
                f"{'' if rel != rel else f'{rel:.1e}'} |"
            )
        if "ours-f2py" in med and "ours" in med:
            # paired per round: both ran in the same round, close in time
            pr = [a["time"] / b["time"] for a, b in zip(res[("ours-f2py", v)], res[("ours", v)])]
            print(
                f"ctypes ?syevr vs SciPy f2py over threads: {med['ours-f2py'] / med['ours']:.2f}x "
                f"(per-round ratios {', '.join(f'{x:.2f}' for x in pr)})"
            )


if __name__ == "__main__":
    main()
