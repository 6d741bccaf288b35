"""Cost of learnable multipliers: forward implementations per layer, and training-step overhead.

Part 1 (``layers``): forward+backward of one Linear layer, plain vs. the three multiplier implementations
(``materialize``: F.linear(x, r W c); ``io``: (x*c) W^T * r), on the
``quick`` shapes (hidden 128, ffn 352, 16x128 tokens) and llama-60m shapes (hidden 512, ffn 1376, 4x256 tokens).

Part 3 (``extra``): the added weight-sized work alone (fwd+bwd of every wrapped Linear's effective weight)
against one plain training step - an additive, less noise-exposed estimate of the overhead.

Part 2 (``steps``): full training step (forward + backward + AdamW step) of our reference model, no
multipliers vs. ``add_multipliers(kind="rowcol", placement="paper")`` (default impls), on
``build_model("tiny", vocab_size=8192)`` with batch 16x128 and ``build_model("llama-60m", vocab_size=32000)``
with batch 4x256.  All variants of one shape live in one process and are timed interleaved (round-robin),
each round running every variant for ``--steps`` steps.  Reported: the minimum over rounds of each variant's
mean step time (robust to load from other processes, which only ever adds time) and the overhead of those
minima, plus the median and range of the per-round paired ratios (which show how noisy the machine was).

    PYTHONPATH=src .venv/bin/python benchmarks/multipliers_overhead.py [--part layers|steps|extra|all]
        [--rounds 7] [--steps 3] [--device cpu|cuda] [--shapes quick,llama-60m]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
from torch import nn

from layerwise.lab.model import build_model
from layerwise.multipliers import MultipliedLinear, add_multipliers, set_multiplier_impl

SHAPES = {
    "quick": dict(size="tiny", vocab=8192, batch=16, seq=128, hidden=128, ffn=352),
    "llama-60m": dict(size="llama-60m", vocab=32000, batch=4, seq=256, hidden=512, ffn=1376),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def _time(fn, n: int, device: str) -> float:
    _sync(device)
    t = CLOCK()
    for _ in range(n):
        fn()
    _sync(device)
    return (CLOCK() - t) / n


def _fwd_bwd(mod: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    for p in mod.parameters():
        p.grad = None
    x.grad = None
    mod(x).backward(dy)


def bench_layers(shape: str, rounds: int, reps: int, device: str) -> list[str]:
    s = SHAPES[shape]
    tokens = s["batch"] * s["seq"]
    rows = []
    for fan_in, fan_out in ((s["hidden"], s["hidden"]), (s["hidden"], s["ffn"]), (s["ffn"], s["hidden"])):
        torch.manual_seed(0)
        base = nn.Linear(fan_in, fan_out, bias=False).to(device)
        variants = {"none": base}
        for impl in ("materialize", "io"):
            variants[impl] = MultipliedLinear(copy.deepcopy(base), "rowcol", impl)
        x = torch.randn(s["batch"], s["seq"], fan_in, device=device, requires_grad=True)
        dy = torch.randn(s["batch"], s["seq"], fan_out, device=device)
        fns = {k: functools.partial(_fwd_bwd, m, x, dy) for k, m in variants.items()}
        for f in fns.values():  # warm-up
            f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                times[k].append(_time(f, reps, device))
        med = {k: min(v) for k, v in times.items()}  # min over rounds: robust to other processes' load
        rows.append(
            f"| {shape} | {fan_in}->{fan_out} | {tokens} | {med['none'] * 1e3:.3f} | "
            + " | ".join(f"{med[k] * 1e3:.3f} ({med[k] / med['none']:.2f}x)" for k in ("materialize", "io"))
            + " |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_steps(shape: str, rounds: int, steps: int, device: str, impls: tuple[str, ...]) -> list[str]:
    s = SHAPES[shape]
    torch.manual_seed(0)
    base = build_model(s["size"], vocab_size=s["vocab"]).to(device)
    models = {"none": base}
    for impl in impls:
        m = copy.deepcopy(base)
        add_multipliers(m, kind="rowcol", placement="paper")
        if impl != "default":
            set_multiplier_impl(m, impl)
        models[f"mult-{impl}"] = m
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), generator=g).to(device)
    x, y = idx[:, :-1], idx[:, 1:]

    def make(k):
        m, o = models[k], opts[k]

        def run():
            o.zero_grad(set_to_none=True)
            m(x, y)[1].backward()
            o.step()

        return run

    fns = {k: make(k) for k in models}
    for f in fns.values():  # warm-up (allocations, optimizer state)
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k, f in fns.items():
            times[k].append(_time(f, steps, device))
        print(f"  round {r}: " + ", ".join(f"{k}={v[-1] * 1e3:.1f}ms" for k, v in times.items()), flush=True)
    rows = []
    n_params = sum(p.numel() for p in base.parameters())
    for k in models:
        if k == "none":
            continue
        ratios = [a / b for a, b in zip(times[k], times["none"])]
        n_mult = sum(p.numel() for p in models[k].parameters()) - n_params
        rows.append(
            f"| {shape} | {s['batch']}x{s['seq']} | {k} | {min(times['none']) * 1e3:.1f} | "
            f"{min(times[k]) * 1e3:.1f} | {(min(times[k]) / min(times['none']) - 1) * 100:+.1f} % | "
            f"{(statistics.median(ratios) - 1) * 100:+.1f} % | "
            f"[{(min(ratios) - 1) * 100:+.1f}, {(max(ratios) - 1) * 100:+.1f}] | {n_mult / n_params * 100:.2f} % |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_extra(shape: str, rounds: int, device: str) -> list[str]:
    """Direct cost of the added work alone: fwd+bwd of every wrapped Linear's effective weight
    (``materialize``), vs. one plain training step (fwd+bwd+AdamW) - an additive estimate of the overhead that
    is less exposed to machine noise than the difference of two full steps."""
    s = SHAPES[shape]
    torch.manual_seed(0)
    plain = build_model(s["size"], vocab_size=s["vocab"]).to(device)
    wrapped = copy.deepcopy(plain)
    add_multipliers(wrapped, kind="rowcol", placement="paper")
    lins = [m for m in wrapped.modules() if isinstance(m, MultipliedLinear)]
    grads = [torch.randn_like(m.weight) for m in lins]
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    idx = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1].to(device), idx[:, 1:].to(device)

    def extra():
        for m, g in zip(lins, grads):
            m.effective_weight().backward(g)

    def step():
        opt.zero_grad()
        plain(x, y)[1].backward()
        opt.step()

    extra(), step()
    t_extra, t_step = [], []
    for _ in range(rounds):
        t_extra.append(_time(extra, 1, device))
        t_step.append(_time(step, 1, device))
    row = (
        f"| {shape} | {s['batch']}x{s['seq']} | {len(lins)} | {min(t_extra) * 1e3:.1f} | {min(t_step) * 1e3:.1f} | "
        f"{min(t_extra) / min(t_step) * 100:.2f} % |"
    )
    print(row, flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("layers", "steps", "extra", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="training steps per variant per round")
    ap.add_argument("--reps", type=int, default=10, help="layer fwd+bwd per variant per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="quick,llama-60m")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu = time.process_time (CPU seconds of this process; with --threads 1 on a machine "
        "loaded by other processes it is far less noisy than wall time; CPU device only)",
    )
    ap.add_argument(
        "--impls",
        default="default",
        help="comma list of multiplier impls for the step benchmark "
        "(default = materialize for Linear, io for Embedding)",
    )
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device != "cpu":
            raise ValueError("--clock cpu only makes sense with --device cpu")
        global CLOCK
        CLOCK = time.process_time
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, clock {args.clock}")
    if args.part in ("layers", "all"):
        print("| shapes | layer | tokens | none ms (min) | materialize ms | io ms |")
        print("|---|---|---|---|---|---|")
        for sh in shapes:
            bench_layers(sh, args.rounds, args.reps, args.device)
    if args.part in ("extra", "all"):
        print("| shapes | batch | wrapped Linears | extra fwd+bwd ms (min) | plain step ms (min) | extra / step |")
        print("|---|---|---|---|---|---|")
        for sh in shapes:
            bench_extra(sh, args.rounds, args.device)
    if args.part in ("steps", "all"):
        print(
            "| shapes | batch | variant | none ms/step (min) | with multipliers ms/step (min) | overhead of mins | "
            "median paired overhead | range of paired overhead | extra params |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for sh in shapes:
            bench_steps(sh, args.rounds, args.steps, args.device, tuple(args.impls.split(",")))


if __name__ == "__main__":
    main()
