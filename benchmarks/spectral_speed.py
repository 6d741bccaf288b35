"""Speed and agreement of layerwise.spectral on the 56 block matrices of a llama-60m-shaped model.

Shapes (8 layers): q/k/v/o 512x512, gate/up 1376x512, down 512x1376.  Two weight variants: random init
N(0, 0.02^2) and a heavy-tailed one (Student-t entries, 3 degrees of freedom, scaled to std 0.02).

Methods, timed interleaved in one process (median over rounds):
  ours        layerwise.spectral.analyze(model)  (full report: batched Gram eigvalsh + Hill + KS distance + metrics)
  ours-core   gram_eigvals + hill_alpha only
  ours-torch  analyze(model, solver="torch")  (torch.linalg.eigvalsh = MKL ?syevd, over a thread pool)
  (a) svd     the AlphaDecay authors' way: torch.linalg.svdvals per matrix, square, sort, Hill (our own code)
  (b) ww      WeightWatcher 0.7.7 WeightWatcher(model).analyze()  (if installed; benchmark-only dependency)

Run:  PYTHONPATH=src .venv/bin/python benchmarks/spectral_speed.py [--rounds 5] [--ww-rounds 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time

import torch
from torch import nn

from layerwise.spectral import analyze, gram_eigvals, hill_alpha, ks_alpha


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


def build(variant: str, seed: int = 0) -> Llama60mShapes:
    g = torch.Generator().manual_seed(seed)
    m = Llama60mShapes()
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ww-rounds", type=int, default=2)
    args = ap.parse_args()
    try:
        import weightwatcher as ww  # noqa: F401

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        have_ww = args.ww_rounds > 0
    except Exception as exc:  # noqa: BLE001
        print(f"WeightWatcher unavailable: {exc}")
        have_ww = False
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}, load avg {os.getloadavg()}")
    for variant in ("init", "heavy"):
        model = build(variant)
        # warm-up
        rep = analyze(model)
        ref = authors_way(model)
        ours_core(model)
        times: dict[str, list[float]] = {"ours": [], "ours-core": [], "ours-torch": [], "(a) svd": [], "(b) ww": []}
        for r in range(args.rounds):
            t, rep = timed(analyze, model)
            times["ours"].append(t)
            t, _ = timed(ours_core, model)
            times["ours-core"].append(t)
            t, _ = timed(analyze, model, solver="torch")
            times["ours-torch"].append(t)
            t, ref = timed(authors_way, model)
            times["(a) svd"].append(t)
            if have_ww and r < args.ww_rounds:
                t, df = timed(lambda: __import__("weightwatcher").WeightWatcher(model=model).analyze())
                times["(b) ww"].append(t)
        med = {k: statistics.median(v) for k, v in times.items() if v}
        rel = max(abs(row["alpha"] - ref[row["name"]]) / abs(ref[row["name"]]) for row in rep.rows)
        print(f"\n## variant {variant}: {len(rep.rows)} matrices, medians over {args.rounds} rounds "
              f"(ww {min(args.ww_rounds, args.rounds) if have_ww else 0})")
        for k, v in med.items():
            print(f"  {k:10s} {v * 1000:8.1f} ms   (a)/this = {med['(a) svd'] / v:5.2f}x"
                  + (f"   ww/this = {med['(b) ww'] / v:5.2f}x" if "(b) ww" in med else ""))
        print(f"  max relative |alpha_ours - alpha_(a)| = {rel:.2e}")
        hill = torch.tensor([row["alpha"] for row in rep.rows])
        ks = ks_alpha(gram_eigvals([mod.weight for mod in model.modules() if isinstance(mod, nn.Linear)]))
        ks2 = ks_alpha(gram_eigvals([mod.weight for mod in model.modules() if isinstance(mod, nn.Linear)]),
                       min_tail=2)
        by_type: dict[str, list[float]] = {}
        for row in rep.rows:
            by_type.setdefault("attn" if row["module_type"] in "qkvo" else "mlp", []).append(row["alpha"])
        print(f"  ours hill alpha: median {hill.median():.3f} (attn {statistics.median(by_type['attn']):.3f}, "
              f"mlp {statistics.median(by_type['mlp']):.3f}), ks distance median "
              f"{statistics.median([r['ks'] for r in rep.rows]):.3f}")
        print(f"  ours ks  alpha (min_tail=10): median {ks.alpha.median():.3f}, n_tail median "
              f"{ks.n_tail.double().median():.0f}, ks median {ks.ks.median():.3f}")
        print(f"  ours ks  alpha (min_tail=2):  median {ks2.alpha.median():.3f}, n_tail median "
              f"{ks2.n_tail.double().median():.0f}")
        if have_ww:
            a = torch.tensor(df["alpha"].to_numpy(dtype=float))
            print(f"  ww alpha: median {a.median():.3f} (min {a.min():.2f}, max {a.max():.2f}), "
                  f"num_pl_spikes median {df['num_pl_spikes'].median():.0f}, D median {df['D'].median():.3f}, "
                  f"xmin/lambda_max median {(df['xmin'] / df['lambda_max']).median():.3f}")


if __name__ == "__main__":
    main()
