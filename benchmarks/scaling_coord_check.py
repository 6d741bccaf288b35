"""Coordinate check of the reference model across widths: SP vs μP (three weight-decay exponents).

Runs :func:`layerwise.scaling.coord_check` on random tokens and prints, per parametrisation, the slope of
log2 RMS(activation) against log2 width at the last recorded step (0 = width-invariant), plus the cost of the
SublayerGains hooks on a forward pass (same process, interleaved).  Plots go to ``--out``.

    PYTHONPATH=src .venv/bin/python benchmarks/scaling_coord_check.py --widths 64,128,256,512 --steps 6
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from layerwise.lab.model import build_model
from layerwise.scaling import SublayerGains, coord_check, plot_coord_check


def builder(parametrization: str, base: int, attn_scale: str):
    def build(width: int):
        mup = parametrization != "sp"
        return build_model(
            "nano",
            vocab_size=256,
            hidden_size=width,
            intermediate_size=int(width * 2.75),
            num_heads=4,
            max_seq_len=64,
            parametrization="mup" if mup else "sp",
            base_hidden_size=base,
            attn_scale=attn_scale if mup else "sqrt",
        )

    return build


def hook_overhead(width: int, reps: int = 30) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(
        "nano", vocab_size=256, hidden_size=width, intermediate_size=int(width * 2.75), num_heads=4, max_seq_len=64
    ).eval()
    idx = torch.randint(256, (8, 64))
    plain, hooked = [], []
    with torch.no_grad():
        for _ in range(3):
            model(idx)
        for _ in range(reps):  # interleaved
            t = time.perf_counter()
            model(idx)
            plain.append(time.perf_counter() - t)
            with SublayerGains(model) as g:
                t = time.perf_counter()
                model(idx)
                hooked.append(time.perf_counter() - t)
            g.metrics()
    plain.sort()
    hooked.sort()
    return plain[len(plain) // 2], hooked[len(hooked) // 2]


def widest_two_slope(r, site: str, step: int) -> float:
    """Slope of log2 RMS against log2 width between the two widest widths of a coord_check result."""
    a, b = r.widths[-2], r.widths[-1]
    return (math.log2(r.rms[site][b][step]) - math.log2(r.rms[site][a][step])) / (math.log2(b) - math.log2(a))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--attn-scale", default="mup", choices=("sqrt", "mup"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/scaling_plots")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    os.makedirs(args.out, exist_ok=True)
    print(
        f"widths {widths}, steps {args.steps}, lr {args.lr}, wd {args.wd}, batch 8x32 random tokens, "
        f"AdamW, attn_scale={args.attn_scale} (μP runs), base width {min(widths)}"
    )
    sites = ("attn", "mlp", "residual", "logits")
    print("slope = least-squares slope of log2 RMS vs log2 width at the last step (all widths / widest two)")
    print("| parametrization | " + " | ".join(f"slope {s}" for s in sites) + " | loss (narrow → wide) |")
    print("|---|" + "---|" * (len(sites) + 1))
    for par in ("sp", "mup", "mup-sqrtwd", "mup-lrwd"):
        t = time.perf_counter()
        r = coord_check(
            widths,
            builder(par, min(widths), args.attn_scale),
            steps=args.steps,
            lr=args.lr,
            weight_decay=args.wd,
            parametrization=par,
            batch_size=8,
            seq_len=32,
            label=par,
        )
        last = args.steps - 1
        slopes = " | ".join(f"{r.slope(s, last):+.2f} / {widest_two_slope(r, s, last):+.2f}" for s in sites)
        loss = f"{r.loss[widths[0]][last]:.3f} → {r.loss[widths[-1]][last]:.3f}"
        print(f"| {par} | {slopes} | {loss} |   ({time.perf_counter() - t:.1f}s)")
        plot_coord_check(r, os.path.join(args.out, f"coord_{par}.png"), title=f"coordinate check: {par}")
    for w in (widths[0], widths[-1]):
        p, h = hook_overhead(w)
        print(
            f"SublayerGains hook overhead, forward at width {w} (8x64 tokens): {p * 1e3:.2f} ms -> "
            f"{h * 1e3:.2f} ms ({h / p:.3f}x)"
        )


if __name__ == "__main__":
    main()
