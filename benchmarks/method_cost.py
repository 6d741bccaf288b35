"""End-to-end cost of each method: tokens/s of `layerwise train` with the method vs AdamW (issue 20, item 3).

Every method (adamw, alphaadam, cautious, alphadecay with the paper's interval 500, multipliers, muon,
scaling) trains the same model on the same batches (random token ids; same seed => same batch order) with
the real trainer (`layerwise.lab.train.train`), evaluation off until the end, spectra/diagnostics off.
The figure is the trainer's own `tokens_per_s` from metrics.jsonl over the steps after the first logging
window (warm-up).  Every (method, round) runs in a FRESH process, in a random order per round; medians, and
the per-round ratio to AdamW of the same round (paired), median.

    PYTHONPATH=src python benchmarks/method_cost.py [--size llama-60m] [--rounds 3] [--steps 12] [--warmup 4]
        [--batch 8] [--seq 256] [--device cpu|cuda] [--methods adamw,alphaadam,...]

AlphaDecay at interval 500 recomputes once at its first step and then every 500 steps: in a short window
its cost is the recomputation spread over --steps (so shorter windows overstate it); the per-recompute
cost is in benchmarks/alphadecay_overhead.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

METHODS = ("adamw", "alphaadam", "cautious", "alphadecay", "multipliers", "muon", "scaling")


def synthetic_data(vocab: int, n_tokens: int, seed: int = 0):
    from layerwise.lab.data import TokenData

    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    train = rng.integers(0, vocab, n_tokens).astype(dtype)
    val = rng.integers(0, vocab, 4 * 1024).astype(dtype)
    # in-memory tokens: the run identity fingerprints the arrays themselves
    files = {
        name: {"bytes": a.nbytes, "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
        for name, a in (("synthetic-train", train), ("synthetic-valid", val))
    }
    return TokenData(dir=Path(tempfile.gettempdir()), train=train, val=val, vocab_size=vocab, meta={"files": files})


def run_method(
    method: str,
    size: str,
    steps: int,
    warmup: int,
    batch: int,
    seq: int,
    device: str,
    vocab: int = 32000,
    extra: list[str] | None = None,
) -> dict:
    from layerwise.lab import config as C
    from layerwise.lab.methods import method_overrides
    from layerwise.lab.train import train

    over = [
        f"model.size={size}",
        f"data.vocab_size={vocab}",
        f"data.seq_len={seq}",
        f"train.batch_size={batch}",
        f"train.max_steps={warmup + steps}",
        "train.eval_every=0",
        f"train.log_every={warmup}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.spectral_every=0",
        "train.diagnostics_every=0",
        f"train.device={device}",
        "decay.interval=500",
    ] + (extra or [])
    cfg = C.resolve("quick", None, over)
    cfg = C.apply_overrides(cfg, method_overrides(method))
    from layerwise.lab.methods import resolve_relative_widths
    from layerwise.lab.model import SIZES

    # "scaling" gives base_hidden_size as -4 (= hidden / 4); resolve it here, as `layerwise compare` does
    resolve_relative_widths(cfg, cfg.model.hidden_size or SIZES[size]["hidden_size"])
    data = synthetic_data(vocab, max(200_000, 4 * batch * (seq + 1)))
    with tempfile.TemporaryDirectory() as d:
        summary = train(cfg, Path(d) / "run", data=data, quiet=True)
        recs = [json.loads(ln) for ln in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tokens_per_s" in r and r["step"] > warmup]
    # windows are log_every steps; weight by tokens (equal windows: plain harmonic mean of rates)
    rates = [r["tokens_per_s"] for r in recs]
    tps = len(rates) / sum(1.0 / x for x in rates)
    return {"tokens_per_s": tps, "final_val_loss": summary.get("final_val_loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="llama-60m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config overrides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        r = run_method(
            args.worker, args.size, args.steps, args.warmup, args.batch, args.seq, args.device, args.vocab, args.extra
        )
        print("RESULT " + json.dumps(r), flush=True)
        return
    methods = args.methods.split(",")
    if "adamw" not in methods:
        methods.insert(0, "adamw")
    rng = random.Random(args.seed)
    print(
        f"torch {torch.__version__}, {args.size}, device {args.device}, batch {args.batch}x{args.seq}, "
        f"{args.steps} timed steps after {args.warmup}; load avg at start {os.getloadavg()}",
        flush=True,
    )
    res: dict[str, list[float]] = {m: [] for m in methods}
    loads = []
    for r in range(args.rounds):
        order = list(methods)
        rng.shuffle(order)
        for m in order:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                m,
                "--size",
                args.size,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--vocab",
                str(args.vocab),
                "--device",
                args.device,
            ] + [f"--set={e}" for e in args.extra]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                raise SystemExit(f"worker {m} failed:\n{p.stderr[-3000:]}")
            res[m].append(json.loads(line[7:])["tokens_per_s"])
            print(f"  round {r} {m}: {res[m][-1]:,.0f} tok/s", flush=True)
        loads.append(os.getloadavg()[0])
    print(f"\nload avg (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    print("\n| method | tokens/s (median) | vs AdamW (median of per-round ratios) | per-round ratios |")
    print("|---|---|---|---|")
    for m in methods:
        ratios = [a / b for a, b in zip(res[m], res["adamw"])]
        print(
            f"| {m} | {statistics.median(res[m]):,.0f} | {statistics.median(ratios) - 1:+.1%} | "
            f"{', '.join(f'{x:.3f}' for x in ratios)} |"
        )


if __name__ == "__main__":
    main()
