"""Tokens/s of `layerwise train` against a minimal hand-written loop (same model, batch, optimizer, clipping),
interleaved in one process.  Target: the harness keeps >= 95 % of the minimal loop's throughput.

    PYTHONPATH=src python benchmarks/trainer_throughput.py [--steps 60] [--rounds 3] [--preset quick]

The harness figure is its own ``tokens_per_s`` from metrics.jsonl (evaluation time excluded), after the
first logging window (warm-up); the minimal loop is timed over the same steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from layerwise.lab import config as C
from layerwise.lab.data import BatchSampler, prepare
from layerwise.lab.model import LlamaModel
from layerwise.lab.train import resolve_model_config, train


def minimal_loop(cfg, data, steps: int, warmup: int) -> float:
    torch.manual_seed(cfg.train.seed)
    model = LlamaModel(resolve_model_config(cfg, data.vocab_size))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        fused=True,
    )
    sampler = BatchSampler(data.train, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        x, y = sampler.get(step)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - warmup) * cfg.train.batch_size * cfg.data.seq_len / (time.perf_counter() - t0)


def harness(cfg, data, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        c = cfg.copy()
        c.train.max_steps, c.train.eval_every, c.train.log_every = steps, 0, warmup
        c.train.progress = False
        train(c, Path(d) / "run", data=data, quiet=True)
        recs = [json.loads(ln) for ln in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    # skip the first window (warm-up); weight the rest by tokens
    tail = [r for r in recs if r["step"] > warmup]
    tokens = sum(warmup * cfg.train.batch_size * cfg.data.seq_len for _ in tail)
    seconds = sum(warmup * cfg.train.batch_size * cfg.data.seq_len / r["tokens_per_s"] for r in tail)
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = C.resolve(args.preset, None, args.overrides)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = prepare(cfg.data.corpus, cfg.data.vocab_size, cfg.data.valid)
    ratios, h_all, m_all = [], [], []
    for r in range(args.rounds):
        h = harness(cfg, data, args.steps, args.warmup)
        m = minimal_loop(cfg, data, args.steps, args.warmup)
        ratios.append(h / m)
        h_all.append(h)
        m_all.append(m)
        print(f"round {r}: harness {h:,.0f} tok/s  minimal {m:,.0f} tok/s  ratio {h / m:.3f}", flush=True)
    print(
        f"median: harness {statistics.median(h_all):,.0f} tok/s, minimal {statistics.median(m_all):,.0f} tok/s, "
        f"ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
