"""AlphaDecay overhead: one α recomputation on llama-60m shapes vs 500 training steps of that model.

    PYTHONPATH=src .venv/bin/python benchmarks/alphadecay_overhead.py [--batch 8] [--seq 256] [--steps 3]
        [--device cpu|cuda] [--repeats 5]

Measures, interleaved in one process:

* ``recompute``: ``AlphaDecay.recompute()`` (batched Gram eigenvalues of the 56 block matrices, Hill α,
  map, writing the groups) on the model's own weights;
* ``svd peer``: the authors' way, one ``torch.linalg.svdvals`` per matrix (float32) + the same Hill α;
* ``train step``: forward + backward + AdamW step of ``build_model("llama-60m", vocab_size=32000)`` at
  ``batch x seq`` tokens, extrapolated to 500 steps;
* the per-step hook cost of the per-step baselines (AWD, AdaDecay) relative to one training step.

Prints a markdown table; the overhead ratio is recompute / (500 x step).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from layerwise.decay import AWD, AdaDecay, AlphaDecay
from layerwise.lab.model import build_model
from layerwise.optim import param_groups
from layerwise.spectral import hill_alpha


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    ap.add_argument("--repeats", type=int, default=5, help="timed recomputations (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype on cuda")
    args = ap.parse_args()
    dev = args.device
    torch.manual_seed(0)
    model = build_model("llama-60m", vocab_size=32000).to(dev)
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.1, per_matrix=True))  # its layout
    dec = AlphaDecay(opt, model, interval=500)
    mats = dec._params
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, 32000, (args.batch, args.seq + 1), generator=g).to(dev)

    def train_step() -> None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda" and args.dtype == "bfloat16")):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def svd_peer() -> None:
        eigs = [torch.linalg.svdvals(w.detach().float()).pow(2).flip(0) for w in mats]
        hill_alpha(eigs)

    # warm-up
    train_step()
    dec.recompute()
    svd_peer()
    steps, recs, svds = [], [], []
    for i in range(max(args.steps, args.repeats)):  # interleave
        if i < args.steps:
            steps.append(timed(train_step, dev))
        if i < args.repeats:
            recs.append(timed(dec.recompute, dev))
            svds.append(timed(svd_peer, dev))
    step = statistics.median(steps)
    rec = statistics.median(recs)
    svd = statistics.median(svds)

    # per-step hook cost of AWD / AdaDecay (gradients present)
    hook_costs = {}
    for cls in (AWD, AdaDecay):
        m2 = build_model("llama-60m", vocab_size=32000).to(dev)
        o2 = torch.optim.AdamW(param_groups(m2, lr=1e-3, weight_decay=0.1, per_matrix=True))
        # AdaDecay: the per-step variant (its default recomputes every 500 steps, like the paper's baseline)
        c = cls(o2, m2, **({"interval": 1, "norm": "rms", "slope": 1.0} if cls is AdaDecay else {}))
        for p in m2.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        hook = functools.partial(c._pre_hook, o2, (), {})  # computes λ and writes it into the groups
        hook()
        hook_costs[cls.name] = statistics.median(timed(hook, dev) for _ in range(5))
        del m2, o2, c, hook

    shapes = sorted({tuple(w.shape) for w in mats})
    print(
        f"device: {dev}"
        + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else f" ({torch.get_num_threads()} threads)")
    )
    print(f"model: llama-60m, {n_params / 1e6:.1f}M params, {len(mats)} analysed matrices, shapes {shapes}")
    print(f"batch: {args.batch} x {args.seq} tokens; autocast {args.dtype if dev == 'cuda' else 'off'}")
    print()
    print("| quantity | seconds |")
    print("|---|---|")
    print(f"| training step (median of {len(steps)}) | {step:.4f} |")
    print(f"| 500 training steps (extrapolated) | {500 * step:.1f} |")
    print(f"| AlphaDecay.recompute() (median of {len(recs)}) | {rec:.4f} |")
    print(f"| authors' way: svdvals per matrix + Hill (median of {len(svds)}) | {svd:.4f} |")
    for k, v in hook_costs.items():
        print(f"| {k} per-step pre-hook | {v:.5f} |")
    print()
    print(f"**overhead = recompute / (500 x step) = {100 * rec / (500 * step):.4f} %** (target <= 1 %)")
    print(f"recompute speed-up over per-matrix SVD: {svd / rec:.2f}x")
    for k, v in hook_costs.items():
        print(f"{k} hook / training step = {100 * v / step:.3f} %")


if __name__ == "__main__":
    main()
