"""Top singular values of the same matrix across widths, from the checkpoints of a `layerwise sweep`.

    PYTHONPATH=src python benchmarks/topsigma_alignment.py runs/sweep [--lr 1e-2 --wd 0.1]

For each parametrization, at one (lr, wd) cell (default: the narrowest width's optimum), reads
``checkpoints/last.pt`` of the narrowest and widest width (every seed; mean ± s.e. over seeds), computes the top
singular value of every block matrix, and reports the ratio σ_top(widest) / σ_top(narrowest) (geometric mean over
matrices, and per module type).  Fan et al.'s claim: under μP with weight decay ∝ √d the top singular values
align across widths (ratio ≈ 1), while other weight-decay exponents let them drift.  Writes ``topsigma.md`` and
``plots/topsigma.png`` in the sweep folder.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from layerwise.anatomy import anatomy
from layerwise.lab.stats import fmt_pm, mean_se
from layerwise.lab.sweep import run_dir, run_key
from layerwise.spectral import gram_eigvals


def top_sigmas(ckpt: Path) -> dict[str, float]:
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    rows = anatomy(sd).block_matrices()
    OPS.update({r.name: (r.block, r.operator or "") for r in rows})
    eigs = gram_eigvals([r.tensor for r in rows])
    return {r.name: float(e[-1].clamp_min(0).sqrt()) for r, e in zip(rows, eigs)}


#: name -> (block, operator) of every matrix seen by top_sigmas
OPS: dict[str, tuple[int | None, str]] = {}


def module_type(name: str) -> str:
    return OPS[name][1]


def geo_mean(ratios: dict[str, float], keys) -> float:
    """Geometric mean of ``ratios[k]`` over ``keys`` (NaN for no keys)."""
    keys = list(keys)
    return math.exp(sum(math.log(ratios[k]) for k in keys) / len(keys)) if keys else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--wd", type=float)
    args = ap.parse_args()
    res = json.loads((args.sweep / "sweep.json").read_text())
    widths = res["widths"]
    lines = [
        f"| parametrization | (lr, wd) | σ_top ratio w={widths[-1]}/w={widths[0]} (geo-mean) | attention | MLP |",
        "|---|---|---|---|---|",
    ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(res["parametrizations"])
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    for ax, p in zip(axes[0], params):
        best = res["parametrizations"][p]["best"][str(widths[0])]
        lr = args.lr if args.lr is not None else best["lr"]
        wd = args.wd if args.wd is not None else best["wd"]
        base_width = res.get("base_width", widths[0])
        per_seed = []  # (all, attention, MLP) geometric-mean ratios, one triple per seed
        by_w = {}
        for seed in range(res.get("seeds", 1)):
            sig = {}
            for w in (widths[0], widths[-1]):
                ck = run_dir(args.sweep, run_key(p, w, base_width), w, lr, wd, seed) / "checkpoints" / "last.pt"
                if ck.exists():
                    sig[w] = top_sigmas(ck)
            if len(sig) < 2:
                continue
            by_w = by_w or sig  # the first seed found is plotted
            lo, hi = sig[widths[0]], sig[widths[-1]]
            ratios = {k: hi[k] / lo[k] for k in lo}
            attn = [k for k in ratios if module_type(k) in ("q", "k", "v", "o")]
            mlp = [k for k in ratios if module_type(k) in ("gate", "up", "down")]
            per_seed.append((geo_mean(ratios, ratios), geo_mean(ratios, attn), geo_mean(ratios, mlp)))
        if not per_seed:
            continue

        cols = " | ".join(fmt_pm(*mean_se([t[i] for t in per_seed]), digits=3) for i in range(3))
        lines.append(f"| {p} | ({lr:g}, {wd:g}) | {cols} |")
        lo = by_w[widths[0]]
        order = sorted(lo, key=lambda k: OPS[k])
        for w, sig in sorted(by_w.items()):
            ax.plot(range(len(order)), [sig[k] for k in order], marker="o", ms=3, label=f"width {w}")
        ax.set(title=f"{p} (lr {lr:g}, wd {wd:g})", xlabel="block matrix (layer, type)", ylabel="top σ")
        ax.legend(fontsize=7)
    md = "\n".join(lines) + "\n"
    (args.sweep / "topsigma.md").write_text(md)
    (args.sweep / "plots").mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.sweep / "plots" / "topsigma.png", dpi=100)
    print(md)


if __name__ == "__main__":
    main()
