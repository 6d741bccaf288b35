"""Optimizer step time on the llama-60m parameter shapes, interleaved against fused AdamW.

    PYTHONPATH=src .venv/bin/python benchmarks/optimizer_step.py [--rounds 15] [--threads N] [--clock cpu]

The ``alpha_lag=1`` rows take alpha from the previous step's statistics (one pass over every tensor); the
warm-up's first step is their exact first step, every timed step is a lagged one.

Shapes (58.1M parameters, the LLaMA-60M of the GaLore/AlphaDecay papers): embed 32000x512,
lm_head 32000x512, 8 blocks of q/k/v/o 512x512, gate/up 1376x512, down 512x1376, two RMSNorm 512,
final norm 512.  Every optimizer works on the same parameter and gradient tensors (each keeps its own
state), so the only difference between timings is the step itself.  Each round times one step of
every optimizer in a rotated order; we report per-optimizer medians and the median over rounds of
the per-round ratio to ``torch.optim.AdamW(fused=True)`` (robust to other load on the machine), and the
ratio of the per-optimizer minimum step times.  ``--clock cpu`` times with the process CPU clock (with
``--threads 1``: time spent running, not waiting for a core other processes hold).  Every optimizer gets
its own parameter-group dict (torch's ``add_param_group`` writes defaults into the dict it is given).

Peak extra memory: per optimizer, the peak resident set size during one step minus the resident size
before it (``/proc/self/clear_refs`` resets the peak; glibc's mmap threshold is pinned so freed
temporaries leave the resident set and are counted again next time).  Linux only; else "n/a".
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time

import torch

from layerwise.optim.alphaadam import AlphaAdam, CautiousAdamW


def llama60m_shapes() -> list[tuple[str, tuple[int, ...]]]:
    vocab, d, ff, layers = 32000, 512, 1376, 8
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        for n in ("q", "k", "v", "o"):
            shapes.append((f"layers.{i}.self_attn.{n}_proj.weight", (d, d)))
        shapes.append((f"layers.{i}.mlp.gate_proj.weight", (ff, d)))
        shapes.append((f"layers.{i}.mlp.up_proj.weight", (ff, d)))
        shapes.append((f"layers.{i}.mlp.down_proj.weight", (d, ff)))
        shapes.append((f"layers.{i}.input_layernorm.weight", (d,)))
        shapes.append((f"layers.{i}.post_attention_layernorm.weight", (d,)))
    shapes.append(("norm.weight", (d,)))
    shapes.append(("lm_head.weight", (vocab, d)))
    return shapes


def _pin_malloc() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: fixed, disables the dynamic threshold
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(step) -> float | None:
    if platform.system() != "Linux":
        return None
    try:
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        return (_rss_kib("VmHWM") - before) / 1024.0
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer (compiles)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every dimension (quick checks)")
    ap.add_argument("--no-eager", action="store_true", help="skip the slow eager reference")
    ap.add_argument(
        "--one-tensor",
        action="store_true",
        help="only the 32000x512 embedding (kernel cost without per-tensor overhead)",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (all threads), less sensitive to other "
        "processes on a loaded machine (use with --threads 1)",
    )
    ap.add_argument(
        "--only", default="", help="comma-separated substrings: time only matching optimizers (fused AdamW always runs)"
    )
    args = ap.parse_args(argv)
    pinned = _pin_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params, names = [], []
    shapes = llama60m_shapes()[:1] if args.one_tensor else llama60m_shapes()
    for name, shape in shapes:
        shape = tuple(max(1, int(s * args.scale)) for s in shape)
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        p.grad = torch.randn(shape) * 1e-3
        params.append(p)
        names.append(name)
    n_params = sum(p.numel() for p in params)

    def group() -> list[dict]:
        # a fresh group dict per optimizer: ``Optimizer.add_param_group`` fills defaults into the dict
        # it is given (``setdefault``), so a shared dict would carry the first optimizer's settings
        # (e.g. ``masking=True``) into every later one
        return [{"params": params, "param_names": names}]

    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opts: dict[str, torch.optim.Optimizer] = {
        "AdamW fused": torch.optim.AdamW(group(), fused=True, **kw),
        "AdamW foreach": torch.optim.AdamW(group(), foreach=True, **kw),
        "AlphaAdam fast (norm, previous)": AlphaAdam(group(), **kw),
        "AlphaAdam fast (density, previous)": AlphaAdam(group(), alpha_mode="density", **kw),
        "AlphaAdam fast masking=False": AlphaAdam(group(), masking=False, **kw),
        "CautiousAdamW fast": CautiousAdamW(group(), **kw),
        # alpha_lag=1: alpha from the previous step's statistics, one pass (the C kernel / compiled kernels)
        "AlphaAdam fast alpha_lag=1 (norm, previous)": AlphaAdam(group(), alpha_lag=1, **kw),
        "CautiousAdamW fast alpha_lag=1": CautiousAdamW(group(), alpha_lag=1, **kw),
        # the inductor-compiled kernels (the default where the C kernel cannot be built, and for bf16)
        "AlphaAdam compiled (norm, previous)": AlphaAdam(group(), cpu_kernel=False, **kw),
        "AlphaAdam compiled masking=False": AlphaAdam(group(), masking=False, cpu_kernel=False, **kw),
        "CautiousAdamW compiled": CautiousAdamW(group(), cpu_kernel=False, **kw),
        "AlphaAdam compiled alpha_lag=1 (norm, previous)": AlphaAdam(group(), alpha_lag=1, cpu_kernel=False, **kw),
    }
    if not args.no_eager:
        opts["AlphaAdam eager (reference)"] = AlphaAdam(group(), fast=False, **kw)
    for name, opt in opts.items():  # guard against the shared-dict mistake above
        g0 = opt.param_groups[0]
        if isinstance(opt, AlphaAdam):
            assert g0["masking"] == ("masking=False" not in name), name
            assert g0["alpha_mode"] == ("density" if "density" in name else "norm"), name
        if isinstance(opt, (AlphaAdam, CautiousAdamW)):
            assert g0["alpha_lag"] == ("alpha_lag=1" in name), name
    base = "AdamW fused"
    if args.only:
        keep = [k.strip() for k in args.only.split(",") if k.strip()]
        opts = {n: o for n, o in opts.items() if n == base or any(k in n for k in keep)}

    compile_s: dict[str, float] = {}
    for name, opt in opts.items():
        t0 = time.perf_counter()
        opt.step()
        compile_s[name] = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            opt.step()

    times: dict[str, list[float]] = {n: [] for n in opts}
    ratios: dict[str, list[float]] = {n: [] for n in opts}
    order = list(opts)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for r in range(args.rounds):
        k = r % len(order)
        this_round: dict[str, float] = {}
        for name in order[k:] + order[:k]:
            t0 = clock()
            opts[name].step()
            this_round[name] = clock() - t0
        for name, t in this_round.items():
            times[name].append(t)
            ratios[name].append(t / this_round[base])

    mem = {name: peak_extra_mib(opt.step) for name, opt in opts.items()}
    state_mib = 2 * n_params * 4 / 2**20

    what = "one 32000x512 tensor" if args.one_tensor else "llama-60m shapes"
    print(
        f"## optimizer step, {what} ({n_params / 1e6:.1f}M params, fp32), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
        f"{args.clock} clock, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| optimizer | median step (s) | min step (s) | median ratio to fused AdamW | "
        "ratio of min steps | first step incl. compile (s) | peak extra memory in a step (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in opts:
        m = mem[name]
        print(
            f"| {name} | {statistics.median(times[name]):.4f} | {min(times[name]):.4f} | "
            f"{statistics.median(ratios[name]):.2f}x | {min(times[name]) / min(times[base]):.2f}x | "
            f"{compile_s[name]:.2f} | "
            f"{'n/a' if m is None else f'{m:.0f}'} |"
        )
    print()
    print(
        f"(one state copy = exp_avg + exp_avg_sq = {state_mib:.0f} MiB; params {state_mib / 2:.0f} MiB; "
        f"malloc pinned: {pinned}; python {sys.version.split()[0]})"
    )
    from layerwise.optim import _cpu_kernel as CK

    print(
        f"C kernel: {'loaded' if CK.load() is not None else 'unavailable (' + str(CK.error()) + ')'}; "
        "the fast rows use it for fp32 CPU tensors.  Its persistent scratch (not in the table: allocated at "
        f"the first step): {max(p.numel() for p in params) * 4 / 2**20:.1f} MiB per optimizer "
        "(fp32, largest parameter)."
    )
    sample = next((o for n, o in opts.items() if n.startswith("AlphaAdam fast (norm")), None)
    if sample is not None:
        print("diagnostics sample (AlphaAdam fast norm):", dict(list(sample.diagnostics().items())[:2]))


if __name__ == "__main__":
    main()
