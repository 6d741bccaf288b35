"""What the module set changes: AlphaDecay's decays with ``modules="blocks"`` (ours: every block matrix) vs
``modules="authors"`` (every nn.Linear but the first and the last: layer 0's ``q_proj`` and ``lm_head`` out)
on the same trained weights.

    PYTHONPATH=src .venv/bin/python benchmarks/authors_modules.py [--steps 50] [--lr 3e-3] [--model both|lab|hf]

Trains (AdamW, lr 3e-3 by default, wd 0.1, 16 x 128 tokens of the Shakespeare corpus with its 4096-token BPE) the lab's
``tiny`` model and a Hugging Face ``LlamaForCausalLM`` of the same shape for ``--steps`` steps, then builds
both controllers on copies of the trained model and prints, for the modules both analyse, how much the
authors' module set moves each decay (``authors / blocks - 1``), by module type, and who sets α_min.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from layerwise.decay import AlphaDecay
from layerwise.names import module_type
from layerwise.optim import param_groups


def _train(model, hf: bool, steps: int, sampler, lr: float) -> None:
    opt = torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=0.1), lr=lr)
    for step in range(steps):
        x, y = sampler.get(step)
        if hf:
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _decays(model, modules: str) -> tuple[dict[str, float], dict[str, float]]:
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(param_groups(m, lr=1e-3, weight_decay=0.1, per_matrix=modules))  # its layout
    dec = AlphaDecay(opt, m, modules=modules, s2=3.0)
    rows = dec.table()
    return {r["name"]: r["weight_decay"] for r in rows}, {r["name"]: r["alpha"] for r in rows}


def report(name: str, model) -> None:
    wd_b, a_b = _decays(model, "blocks")
    wd_a, a_a = _decays(model, "authors")
    common = [n for n in wd_b if n in wd_a]
    amin_b = min(a_b, key=a_b.get)
    amin_a = min(a_a, key=a_a.get)
    print(f"\n### {name}\n")
    print(
        f"blocks: {len(wd_b)} matrices, α_min = {a_b[amin_b]:.3f} ({amin_b}); authors: {len(wd_a)} matrices, "
        f"α_min = {a_a[amin_a]:.3f} ({amin_a}); α_max {max(a_b.values()):.3f} / {max(a_a.values()):.3f}\n"
    )
    print("| module type | n | decay change authors/blocks − 1: min | median | max |")
    print("|---|---|---|---|---|")
    for kind in ("q", "k", "v", "o", "gate", "up", "down"):
        ch = [wd_a[n] / wd_b[n] - 1 for n in common if module_type(n) == kind]
        if ch:
            print(f"| {kind} | {len(ch)} | {min(ch):+.1%} | {statistics.median(ch):+.1%} | {max(ch):+.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model", choices=("both", "lab", "hf"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from layerwise.lab import data as lab_data
    from layerwise.lab.model import build_model, model_config

    td = lab_data.prepare("shakespeare", 4096)
    sampler = lab_data.BatchSampler(td.train, 128, 16, seed=args.seed)
    mc = model_config("tiny", vocab_size=td.vocab_size)
    print(f"{args.steps} AdamW steps (lr {args.lr:g}, wd 0.1, batch 16 x 128, Shakespeare BPE-4096), seed {args.seed}")
    if args.model in ("both", "lab"):
        torch.manual_seed(args.seed)
        lab = build_model("tiny", vocab_size=td.vocab_size)
        _train(lab, False, args.steps, sampler, args.lr)
        report(f"lab model `tiny` ({sum(p.numel() for p in lab.parameters()) / 1e6:.1f} M parameters)", lab)
    if args.model in ("both", "hf"):
        import transformers

        torch.manual_seed(args.seed)
        cfg = transformers.LlamaConfig(
            vocab_size=td.vocab_size,
            hidden_size=mc.hidden_size,
            intermediate_size=mc.intermediate_size,
            num_hidden_layers=mc.num_layers,
            num_attention_heads=mc.num_heads,
            num_key_value_heads=mc.num_heads,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        hf = transformers.LlamaForCausalLM(cfg)
        _train(hf, True, args.steps, sampler, args.lr)
        report(
            f"HF LlamaForCausalLM, same shape ({sum(p.numel() for p in hf.parameters()) / 1e6:.1f} M parameters)", hf
        )


if __name__ == "__main__":
    main()
