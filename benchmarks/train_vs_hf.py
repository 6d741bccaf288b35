"""Training speed of the harness's model vs Hugging Face LlamaForCausalLM, eager and compiled (issue 20, item 2).

Both models are built from the same shapes (layerwise.lab.model.SIZES: hidden, intermediate, layers, heads,
vocab; RMSNorm eps 1e-6, rope theta 1e4, untied head, no biases, SDPA attention) and trained by the same
plain loop on the same batches (random token ids, seed 0): forward, cross-entropy on the logits, backward,
clip at 1.0, fused AdamW, zero_grad.  Variants: ours / hf x eager / torch.compile (default inductor).
Every (variant, round) runs in a FRESH process in a random order per round; figures are medians of
tokens/s over the timed steps (after --warmup steps, which include compilation).

    PYTHONPATH=src python benchmarks/train_vs_hf.py [--sizes tiny,llama-60m] [--rounds 3] [--steps 10]
        [--warmup 3] [--batch 8] [--seq 256] [--device cpu|cuda] [--no-compile]

The trainer's own overhead over such a loop (its `tokens_per_s` vs this loop) is benchmarks/trainer_throughput.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VOCAB = 32000


def build(kind: str, size: str, vocab: int, seq: int, device: str):
    from layerwise.lab.model import SIZES, LlamaModel, model_config

    c = SIZES[size]
    torch.manual_seed(0)
    if kind == "ours":
        return LlamaModel(model_config(size, vocab_size=vocab, max_seq_len=max(seq, c["max_seq_len"]))).to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(
        vocab_size=vocab,
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"],
        num_key_value_heads=c["num_heads"],
        max_position_embeddings=max(seq, c["max_seq_len"]),
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    hc._attn_implementation = "sdpa"
    return LlamaForCausalLM(hc).to(device)


def loss_fn(kind: str, model, x, y):
    if kind == "ours":
        return model(x, y)[1]
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


def run_loop(
    kind: str,
    size: str,
    compiled: bool,
    steps: int,
    warmup: int,
    batch: int,
    seq: int,
    device: str,
    vocab: int = VOCAB,
    bf16: bool | None = None,
    backend: str = "inductor",
) -> dict:
    """Train ``warmup + steps`` steps; tokens/s over the last ``steps`` (device-synchronised)."""
    model = build(kind, size, vocab, seq, device)
    fwd = torch.compile(model, backend=backend) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (warmup + steps, batch, seq + 1), generator=g)
    bf16 = (device.startswith("cuda")) if bf16 is None else bf16
    ctx = (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    losses = []
    t0 = None
    for s in range(warmup + steps):
        if s == warmup:
            sync()
            t0 = time.perf_counter()
        xy = data[s].to(device)
        with ctx():
            loss = loss_fn(kind, fwd, xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    dt = time.perf_counter() - t0
    return {
        "tokens_per_s": steps * batch * seq / dt,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "params": sum(p.numel() for p in model.parameters()),
    }


def _worker(args) -> None:
    kind, mode = args.worker.split("-")
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run_loop(kind, args.size, mode == "compiled", args.steps, args.warmup, args.batch, args.seq, args.device)
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,llama-60m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    variants = ["ours-eager", "hf-eager"] + ([] if args.no_compile else ["ours-compiled", "hf-compiled"])
    rng = random.Random(args.seed)
    print(
        f"torch {torch.__version__}, device {args.device}, batch {args.batch}x{args.seq}, "
        f"load avg at start {os.getloadavg()}",
        flush=True,
    )
    res: dict[tuple[str, str], list[dict]] = {}
    loads = []
    for r in range(args.rounds):
        jobs = [(v, s) for s in args.sizes.split(",") for v in variants]
        rng.shuffle(jobs)
        for v, s in jobs:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                v,
                "--size",
                s,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                raise SystemExit(f"worker {v}/{s} failed:\n{p.stderr[-3000:]}")
            res.setdefault((v, s), []).append(json.loads(line[7:]))
            print(f"  round {r} {s} {v}: {res[(v, s)][-1]['tokens_per_s']:,.0f} tok/s", flush=True)
        loads.append(os.getloadavg()[0])
    print(f"\nload avg (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    print(
        "\n| size | params (ours / hf) | ours eager | hf eager | ours/hf eager | ours compiled | hf compiled "
        "| compile speed-up ours / hf |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in args.sizes.split(","):
        med = {v: statistics.median(x["tokens_per_s"] for x in res[(v, s)]) for v in variants}
        pr = (res[("ours-eager", s)][0]["params"], res[("hf-eager", s)][0]["params"])
        row = (
            f"| {s} | {pr[0] / 1e6:.1f}M / {pr[1] / 1e6:.1f}M | {med['ours-eager']:,.0f} | {med['hf-eager']:,.0f} | "
            f"{med['ours-eager'] / med['hf-eager']:.2f}x |"
        )
        if not args.no_compile:
            row += (
                f" {med['ours-compiled']:,.0f} | {med['hf-compiled']:,.0f} | "
                f"{med['ours-compiled'] / med['ours-eager']:.2f}x / {med['hf-compiled'] / med['hf-eager']:.2f}x |"
            )
        else:
            row += " - | - | - |"
        print(row)


if __name__ == "__main__":
    main()
