"""Coordinate checks across widths: SP vs μP.

``--suite reference`` (default): the reference model with μP built in, three weight-decay exponents, plus the
cost of the SublayerGains hooks on a forward pass (same process, interleaved).  Plots go to ``--out``.

    PYTHONPATH=src .venv/bin/python benchmarks/scaling_coord_check.py --widths 64,128,256,512 --steps 6

``--suite models`` (issue 14): models that know nothing of μP — ``transformers.LlamaForCausalLM``,
``GPT2LMHeadModel`` (tied head, fused Conv1D qkv) and a hand-written classifier (Linear(10, d) -> 2 hidden
Linear(d, d) -> Linear(d, 3), PyTorch's default init, feature inputs) — made μP with
``WidthScaling.from_models(model, base=<the base-width model on the meta device>)`` and ``rule.apply_(model)``,
against the same models untouched (SP), with fresh random batches every step and with one fixed batch (mup's
``fix_data=True``).  Plots go to ``benchmarks/results/plots/coord_models_<model>_<sp|mup>_<fresh|fixed>.png``.

    PYTHONPATH=src .venv/bin/python benchmarks/scaling_coord_check.py --suite models \
        --widths 64,128,256,512 --steps 6 --seeds 3

Every line reports the slope of log2 RMS(activation) against log2 width at the last recorded step
(0 = width-invariant) over all widths / over the widest pair.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from layerwise.lab.model import build_model
from layerwise.scaling import SublayerGains, WidthScaling, coord_check, plot_coord_check


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


def slopes(r, site: str, step: int) -> str:
    """``all widths / widest pair`` slopes of one site at one step ("–" for a site the model lacks)."""
    if site not in r.rms:
        return "–"
    return f"{r.slope(site, step):+.2f} / {r.slope(site, step, widths=r.widths[-2:]):+.2f}"


def seed_slopes(results: list, site: str, step: int) -> str:
    """Mean ± standard error over seeds of the all-widths slope / of the widest-pair slope."""
    if site not in results[0].rms:
        return "–"

    def stat(vals: list[float]) -> str:
        n = len(vals)
        mean = sum(vals) / n
        se = (sum((v - mean) ** 2 for v in vals) / (n - 1)) ** 0.5 / n**0.5 if n > 1 else float("nan")
        return f"{mean:+.2f} ± {se:.2f}"

    full = [r.slope(site, step) for r in results]
    pair = [r.slope(site, step, widths=r.widths[-2:]) for r in results]
    return f"{stat(full)} / {stat(pair)}"


# ------------------------------------------------------------------------------ models without μP built in
class HandNet(nn.Module):
    """Linear(10, d) -> ReLU -> 2 × (Linear(d, d) -> ReLU) -> Linear(d, 3); PyTorch's default init."""

    def __init__(self, width: int, d_in: int = 10, n_classes: int = 3) -> None:
        super().__init__()
        self.input = nn.Linear(d_in, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.input(x))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.head(h)


def hf_model(kind: str, width: int) -> nn.Module:
    import transformers

    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=width,
            intermediate_size=int(width * 2.75),
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(
        vocab_size=256,
        n_embd=width,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def model_builder(kind: str, mup: bool, base: int):
    """``width -> model`` (SP: untouched) or ``width -> (model, rule)`` (μP: from_models + apply_)."""

    def make(width: int) -> nn.Module:
        return HandNet(width) if kind == "handnet" else hf_model(kind, width)

    def build(width: int):
        model = make(width)
        if not mup:
            return model
        with torch.device("meta"):
            base_model = make(base)
        rule = WidthScaling.from_models(model, base=base_model)
        rule.apply_(model, init="fan_in" if kind == "handnet" else "constant")
        return model, rule

    return build


def models_suite(args, widths: list[int]) -> None:
    out = "benchmarks/results/plots"
    os.makedirs(out, exist_ok=True)
    base = min(widths)
    print(
        f"widths {widths}, base width {base}, steps {args.steps}, AdamW lr {args.lr}, λ {args.wd}; LMs: batch 8x32 "
        "random tokens, vocab 256, 2 layers, 4 heads (head size grows with width); handnet: batch 32 of 10 "
        f"standard-normal features, 3 random classes; seeds 0..{args.seeds - 1} (slopes: mean ± s.e. over seeds, "
        "all widths / widest pair)"
    )
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    sites = ("embedding", "attn", "mlp", "residual", "hidden", "logits")
    print(
        "| model | batches | parametrization | "
        + " | ".join(f"slope {s}" for s in sites)
        + " | loss at last step (narrow → wide) |"
    )
    print("|---|---|---|" + "---|" * (len(sites) + 1))
    last = args.steps - 1
    for kind in ("llama", "gpt2", "handnet"):
        for fixed in (False, True):
            for mup in (False, True):
                t = time.perf_counter()
                kw: dict = (
                    dict(batch_size=32, input_shape=(10,)) if kind == "handnet" else dict(batch_size=8, seq_len=32)
                )
                data = "fixed" if fixed else "fresh"
                runs = [
                    coord_check(
                        widths,
                        model_builder(kind, mup, base),
                        steps=args.steps,
                        lr=args.lr,
                        weight_decay=args.wd,
                        parametrization="sp",
                        fix_data=fixed,
                        seed=seed,
                        label=f"{kind} {'μP' if mup else 'SP'}, {data} batches",
                        **kw,
                    )
                    for seed in range(args.seeds)
                ]
                r = runs[0]
                par = "μP (from_models + apply_)" if mup else "SP"
                loss = f"{r.loss[widths[0]][last]:.3f} → {r.loss[widths[-1]][last]:.3f}"
                cells = " | ".join(seed_slopes(runs, s, last) for s in sites)
                print(f"| {kind} | {data} | {par} | {cells} | {loss} |   ({time.perf_counter() - t:.1f}s)")
                name = f"coord_models_{kind}_{'mup' if mup else 'sp'}_{data}.png"
                plot_coord_check(r, os.path.join(out, name), title=f"coordinate check: {r.label}")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="reference", choices=("reference", "models"))
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--attn-scale", default="mup", choices=("sqrt", "mup"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3, help="--suite models: seeds per row")
    ap.add_argument("--out", default="benchmarks/results/scaling_plots")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    if args.suite == "models":
        models_suite(args, widths)
        return
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

        cells = " | ".join(slopes(r, s, last) for s in sites)
        loss = f"{r.loss[widths[0]][last]:.3f} → {r.loss[widths[-1]][last]:.3f}"
        print(f"| {par} | {cells} | {loss} |   ({time.perf_counter() - t:.1f}s)")
        plot_coord_check(r, os.path.join(args.out, f"coord_{par}.png"), title=f"coordinate check: {par}")
    for w in (widths[0], widths[-1]):
        p, h = hook_overhead(w)
        print(
            f"SublayerGains hook overhead, forward at width {w} (8x64 tokens): {p * 1e3:.2f} ms -> "
            f"{h * 1e3:.2f} ms ({h / p:.3f}x)"
        )


if __name__ == "__main__":
    main()
