"""One prepared GPU check (issue 20, item 5): run it once when a CUDA device is lent for a few minutes.

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check      (one CUDA device, target <= 8 minutes)
    PYTHONPATH=src python benchmarks/gpu_check.py --dry-run --out /tmp/gc   (CPU, tiny sizes: checks the script)

Sections (each timed, each failure recorded in the JSON instead of stopping the run):
  1. methods   bf16-autocast training steps of the real trainer with every method (tokens/s, loss finite)
  2. optim     AlphaAdam / CautiousAdamW step time vs torch AdamW(fused=True) on llama-60m-sized tensors
  3. spectral  gram_eigvals of the 56 llama-60m block matrices on the device vs per-matrix svdvals
  4. compile   harness model vs HF LlamaForCausalLM, eager and torch.compile (tokens/s)
  5. mfu       llama-60m tokens/s with model FLOPs utilisation (6·N·tokens + attention, vs --peak-tflops)
Writes OUT/gpu_check.json and OUT/gpu_check.md (one markdown table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from method_cost import METHODS, run_method  # noqa: E402
from train_vs_hf import run_loop  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, reps: int) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def sec_methods(a) -> list[dict]:
    rows = []
    extra = [] if a.dry_run else ["train.dtype=bf16"]
    for m in METHODS:
        r = run_method(m, a.size, a.steps, a.warmup, a.batch, a.seq, a.device, a.vocab, extra)
        ok = r["final_val_loss"] is not None and math.isfinite(r["final_val_loss"])
        rows.append(
            {
                "section": "methods",
                "what": m,
                "tokens_per_s": r["tokens_per_s"],
                "final_val_loss": r["final_val_loss"],
                "ok": ok,
            }
        )
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_adamw"] = r["tokens_per_s"] / base
    return rows


def sec_optim(a) -> list[dict]:
    from layerwise.lab.model import SIZES
    from layerwise.optim import AlphaAdam, CautiousAdamW

    c = SIZES[a.size]
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_layers"]
    shapes = [(d, d)] * 4 * L + [(f, d), (f, d), (d, f)] * L + [(a.vocab, d)] * 2
    g = torch.Generator().manual_seed(0)

    def make(cls, **kw):
        ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(a.device)) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        return cls(ps, lr=1e-3, weight_decay=0.1, **kw)

    opts = {
        "adamw_fused": make(torch.optim.AdamW, fused=True),
        "alphaadam": make(AlphaAdam),
        "cautious": make(CautiousAdamW),
    }
    times = {k: _time(o.step, a.device, a.reps) for k, o in opts.items()}
    return [
        {"section": "optim", "what": k, "step_s": v, "vs_adamw_fused": v / times["adamw_fused"], "ok": True}
        for k, v in times.items()
    ]


def sec_spectral(a) -> list[dict]:
    from layerwise.lab.model import SIZES
    from layerwise.spectral import gram_eigvals, hill_alpha

    c = SIZES[a.size]
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_layers"]
    g = torch.Generator().manual_seed(0)
    ws = [
        (torch.randn(s, generator=g) * 0.02).to(a.device)
        for _ in range(L)
        for s in [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
    ]
    t_ours = _time(lambda: hill_alpha(gram_eigvals(ws)), a.device, a.reps)
    t_svd = _time(lambda: [torch.linalg.svdvals(w) for w in ws], a.device, a.reps)
    ea = gram_eigvals(ws)
    es = [torch.linalg.svdvals(w.double()).pow(2).flip(0) for w in ws]
    rel = max(float((x.double() - y).abs().max() / y.max()) for x, y in zip(ea, es))
    return [
        {
            "section": "spectral",
            "what": f"gram_eigvals ({len(ws)} matrices)",
            "time_s": t_ours,
            "svdvals_s": t_svd,
            "speedup": t_svd / t_ours,
            "max_rel_err": rel,
            "ok": rel < 1e-4,
        }
    ]


def sec_compile(a) -> list[dict]:
    rows = []
    for kind in ("ours", "hf"):
        for comp in (False, True):
            r = run_loop(
                kind,
                a.size,
                comp,
                a.steps,
                a.warmup,
                a.batch,
                a.seq,
                a.device,
                a.vocab,
                backend="aot_eager" if a.dry_run else "inductor",
            )
            rows.append(
                {
                    "section": "compile",
                    "what": f"{kind}-{'compiled' if comp else 'eager'}",
                    "tokens_per_s": r["tokens_per_s"],
                    "ok": math.isfinite(r["last_loss"]),
                }
            )
    return rows


def sec_mfu(a) -> list[dict]:
    from layerwise.lab.model import SIZES

    r = run_loop("ours", a.size, not a.dry_run, a.steps, a.warmup, a.batch, a.seq, a.device, a.vocab)
    c = SIZES[a.size]
    n_nonemb = r["params"] - a.vocab * c["hidden_size"]  # the head's matmul counts, the embedding lookup not
    flops_per_token = 6 * n_nonemb + 12 * c["num_layers"] * c["hidden_size"] * a.seq
    achieved = flops_per_token * r["tokens_per_s"]
    return [
        {
            "section": "mfu",
            "what": f"{a.size} ours {'compiled' if not a.dry_run else 'eager'}",
            "tokens_per_s": r["tokens_per_s"],
            "tflops": achieved / 1e12,
            "mfu": achieved / (a.peak_tflops * 1e12) if a.peak_tflops else None,
            "ok": True,
        }
    ]


SECTIONS = {
    "methods": sec_methods,
    "optim": sec_optim,
    "spectral": sec_spectral,
    "compile": sec_compile,
    "mfu": sec_mfu,
}


def to_markdown(rows: list[dict]) -> str:
    keys = [
        "tokens_per_s",
        "vs_adamw",
        "step_s",
        "vs_adamw_fused",
        "time_s",
        "svdvals_s",
        "speedup",
        "tflops",
        "mfu",
        "final_val_loss",
        "max_rel_err",
        "seconds",
        "error",
    ]
    used = [k for k in keys if any(k in r and r[k] is not None for r in rows)]
    out = ["| section | what | ok | " + " | ".join(used) + " |", "|---|---|---|" + "---|" * len(used)]

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v).replace("|", "/")[:80]

    for r in rows:
        out.append(
            f"| {r['section']} | {r['what']} | {'yes' if r.get('ok') else 'NO'} | "
            + " | ".join(fmt(r.get(k)) for k in used)
            + " |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="CPU, nano model, 1-2 steps: checks the script")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's dense bf16 peak for MFU (e.g. 989 for H100 SXM); 0: from the device name",
    )
    a = ap.parse_args(argv)
    if a.dry_run:
        a.device, a.size, a.vocab, a.batch, a.seq, a.steps, a.warmup, a.reps = "cpu", "nano", 512, 2, 32, 2, 1, 1
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run to check the script on CPU)", file=sys.stderr)
            return 2
        a.device, a.size, a.vocab, a.batch, a.seq, a.steps, a.warmup, a.reps = (
            "cuda",
            "llama-60m",
            32000,
            32,
            256,
            20,
            5,
            10,
        )
        if not a.peak_tflops:
            name = torch.cuda.get_device_name()
            a.peak_tflops = next(
                (
                    v
                    for k, v in {
                        "H200": 989.0,
                        "H100": 989.0,
                        "A100": 312.0,
                        "L40S": 362.0,
                        "A10": 125.0,
                        "4090": 165.0,
                    }.items()
                    if k in name
                ),
                0.0,
            )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor(),
        "dry_run": a.dry_run,
        "size": a.size,
        "batch": [a.batch, a.seq],
        "peak_tflops": a.peak_tflops,
        "load_avg": os.getloadavg(),
    }
    rows: list[dict] = []
    t_all = time.perf_counter()
    for name in a.sections.split(","):
        if name not in SECTIONS:
            print(f"gpu_check: unknown section {name!r} (known: {', '.join(SECTIONS)})", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        try:
            got = SECTIONS[name](a)
        except Exception as exc:  # noqa: BLE001 - recorded, the other sections still run
            got = [
                {
                    "section": name,
                    "what": "failed",
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                }
            ]
        dt = time.perf_counter() - t0
        for r in got:
            r.setdefault("seconds", dt)
        rows += got
        print(f"gpu_check: {name} done in {dt:.1f} s", flush=True)
    info["total_s"] = time.perf_counter() - t_all
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str))
    os.replace(tmp, out / "gpu_check.json")
    md = (
        f"gpu_check on {info['device_name'] or info['device']} (torch {info['torch']}, {a.size}, "
        f"{'dry run' if a.dry_run else 'bf16 autocast'}), {info['total_s']:.0f} s\n\n" + to_markdown(rows) + "\n"
    )
    (out / "gpu_check.md").write_text(md)
    print(md)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
