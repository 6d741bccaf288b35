"""Time and peak memory of `layerwise analyze` on synthetic bf16 checkpoints of growing size (issue 20, item 1).

For each size (layerwise.lab.model.SIZES: llama-60m, -135m, -350m, -1b; vocab 32000), a Hugging Face folder
is written to --tmp (sharded safetensors, <= --shard-mb per shard, with model.safetensors.index.json),
tensor by tensor so the writer never holds the model.  Then `layerwise analyze DIR --no-plots` runs in a
FRESH process that reports its resident set before the analysis and its peak (VmHWM); the folder is
deleted afterwards.  The baseline is taken after imports and a warm-up `analyze` of a tiny in-memory
model, so the code pages that any first analysis touches (a constant few MiB, whatever the checkpoint)
are not counted as working set.  With --eager the old behaviour (load_state_dict: every tensor in memory,
then analyze) is measured on the same folder for comparison; with --ww (sizes listed), WeightWatcher
0.7.7 (`pip install weightwatcher==0.7.7`) on the same weights: an HF LlamaForCausalLM (fp32) built from
the folder, then `WeightWatcher(model).analyze()` (its own layer choice: every Linear layer).

The bound from the issue: peak working set (peak RSS - baseline RSS) below ~2x the largest analysed
tensor in fp32 plus its Gram matrix, independent of the model's size.

    PYTHONPATH=src python benchmarks/analyze_scale.py [--sizes llama-60m,llama-135m,llama-350m,llama-1b]
        [--eager llama-60m,llama-135m] [--ww llama-60m,llama-135m] [--tmp /tmp]
        [--tiny]   (--tiny: sizes nano,tiny, a check of the script)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 32000


def hf_shapes(size: str, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    from layerwise.lab.model import SIZES

    c = SIZES[size]
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_layers"]
    out = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
        out += [(p + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        out += [
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return out


def write_checkpoint(folder: Path, size: str, vocab: int, shard_mb: float, seed: int = 0) -> int:
    """A sharded bf16 HF folder; returns its bytes.  Entries N(0, 0.02^2) (norms: ones)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    cur = 0
    weight_map: dict[str, int] = {}
    total = 0

    def flush(k: int) -> None:
        save_file(shards[k], str(folder / f"part-{k}.tmp"))
        shards[k] = {}

    for name, shape in hf_shapes(size, vocab):
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(0.02)
        t = t.to(torch.bfloat16)
        nbytes = t.numel() * 2
        if shards[-1] and cur + nbytes > shard_mb * 2**20:
            flush(len(shards) - 1)
            shards.append({})
            cur = 0
        shards[-1][name] = t
        weight_map[name] = len(shards) - 1
        cur += nbytes
        total += nbytes
    flush(len(shards) - 1)
    n = len(shards)
    names = {k: f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)}
    for k, nm in names.items():
        os.replace(folder / f"part-{k}.tmp", folder / nm)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": {w: names[k] for w, k in weight_map.items()}})
    )
    return total


_WORKER = r"""
import json, sys, time
def rss(field):
    for l in open('/proc/self/status'):
        if l.startswith(field):
            return int(l.split()[1]) * 1024
import torch
import safetensors, scipy.linalg.lapack  # runtime libraries in the baseline, not in the working set
from layerwise.lab import analyze as cli
from layerwise.lab.model import build_model
from layerwise.lab.weight_source import InMemorySource
from layerwise.spectral import analyze
mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
# warm-up: one small analysis through the same code (its code pages belong to the baseline)
warm = {k: v.detach().to(torch.bfloat16) for k, v in build_model('nano', vocab_size=64).state_dict().items()}
cli.analyze_source(InMemorySource(path, warm), keep_eigs=True)
analyze(warm)
del warm
extra = {}
if mode == 'ww':
    import logging
    import weightwatcher
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    logging.getLogger('weightwatcher').setLevel(logging.ERROR)
    c = json.loads(sys.argv[4])
base = rss('VmRSS')
t0 = time.perf_counter()
if mode == 'lazy':
    rc = cli.main([path, '--no-plots', '--out', out] + sys.argv[4:])
    assert rc == 0, rc
elif mode == 'eager':  # the old way: every tensor in memory first
    sd, _ = cli.load_state_dict(path)
    rep = analyze(sd, keep_eigs=True)
    assert rep.rows
else:  # WeightWatcher on an HF model built from the folder
    import glob
    cfg = LlamaConfig(vocab_size=c['vocab'], hidden_size=c['hidden_size'], intermediate_size=c['intermediate_size'],
                      num_hidden_layers=c['num_layers'], num_attention_heads=c['num_heads'], tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    for shard in sorted(glob.glob(path + '/*.safetensors')):
        model.load_state_dict(load_file(shard), strict=False)
    extra['load_s'] = time.perf_counter() - t0
    details = weightwatcher.WeightWatcher(model=model).analyze()
    extra['layers'] = len(details)
wall = time.perf_counter() - t0
print('RESULT ' + json.dumps({'base_rss': base, 'peak_rss': rss('VmHWM'), 'wall': wall, **extra}))
"""


def largest_bound(size: str, vocab: int) -> tuple[int, tuple[int, int]]:
    """2 x the largest analysed (block) matrix in fp32 + its Gram matrix, in bytes."""
    mats = [s for n, s in hf_shapes(size, vocab) if len(s) == 2 and ".layers." in n]
    big = max(mats, key=lambda s: s[0] * s[1])
    n = min(big)
    return 2 * 4 * big[0] * big[1] + 4 * n * n, big


def run_worker(mode: str, folder: Path, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-c", _WORKER, mode, str(folder), str(out), *extra], capture_output=True, text=True, env=env
    )
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"{mode} worker on {folder} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="llama-60m,llama-135m,llama-350m,llama-1b")
    ap.add_argument("--eager", default="llama-60m,llama-135m", help="sizes also measured the old (eager) way")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--shard-mb", type=float, default=500.0)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--tiny", action="store_true", help="nano,tiny sizes with vocab 512: checks the script")
    ap.add_argument("--ww", default="", help="sizes also analysed by WeightWatcher 0.7.7 (if installed)")
    ap.add_argument("--analyze-args", default="", help="extra `layerwise analyze` flags, e.g. '--device cuda'")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    sizes = ["nano", "tiny"] if args.tiny else args.sizes.split(",")
    eager = set(sizes if args.tiny else [s for s in args.eager.split(",") if s])
    ww = {s for s in args.ww.split(",") if s}
    vocab = 512 if args.tiny else args.vocab
    results = []
    print(f"torch {torch.__version__}, cpus {os.cpu_count()}, load avg {os.getloadavg()}", flush=True)
    for size in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"lw_analyze_{size}_", dir=args.tmp))
        try:
            t0 = time.perf_counter()
            nbytes = write_checkpoint(work / "hf", size, vocab, args.shard_mb)
            t_write = time.perf_counter() - t0
            n_shards = len(list((work / "hf").glob("*.safetensors")))
            bound, big = largest_bound(size, vocab)
            rec = {
                "size": size,
                "bytes": nbytes,
                "shards": n_shards,
                "bound": bound,
                "largest": big,
                "write_s": t_write,
            }
            load0 = os.getloadavg()[0]
            rec["lazy"] = run_worker("lazy", work / "hf", work / "out", args.analyze_args.split())
            if size in eager:
                rec["eager"] = run_worker("eager", work / "hf", work / "out2", [])
            if size in ww:
                from layerwise.lab.model import SIZES

                c = dict(SIZES[size], vocab=vocab)
                rec["ww"] = run_worker("ww", work / "hf", work / "out3", [json.dumps(c)])
            rec["load"] = (load0 + os.getloadavg()[0]) / 2
            rows = json.loads((work / "out" / "spectral.json").read_text())["rows"]
            rec["matrices"] = len(rows)
            results.append(rec)
            lz = rec["lazy"]
            print(
                f"{size}: {nbytes / 2**20:,.0f} MiB in {n_shards} shards, {len(rows)} matrices, lazy "
                f"{lz['wall']:.1f} s, peak RSS {lz['peak_rss'] / 2**20:,.0f} MiB (after imports "
                f"{lz['base_rss'] / 2**20:,.0f} MiB, working set {(lz['peak_rss'] - lz['base_rss']) / 2**20:,.0f} "
                f"MiB; bound {bound / 2**20:,.0f} MiB)"
                + (
                    f"; eager {rec['eager']['wall']:.1f} s, peak {rec['eager']['peak_rss'] / 2**20:,.0f} MiB"
                    if "eager" in rec
                    else ""
                )
                + (
                    f"; WeightWatcher {rec['ww']['wall']:.1f} s (load {rec['ww']['load_s']:.1f} s, "
                    f"{rec['ww']['layers']} layers), peak {rec['ww']['peak_rss'] / 2**20:,.0f} MiB"
                    if "ww" in rec
                    else ""
                )
                + f"; load avg {rec['load']:.1f}",
                flush=True,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "\n| size | checkpoint (bf16) | matrices | lazy time | lazy peak RSS | working set (peak - after imports) "
        "| bound (2x largest fp32 + Gram) | working set / bound | eager time | eager peak RSS | WeightWatcher time "
        "| load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lz, eg = r["lazy"], r.get("eager")
        eg_wall = f"{eg['wall']:.1f} s" if eg else "-"
        mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        mib1 = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
        print(
            f"| {r['size']} | {mib(r['bytes'])} ({r['shards']} shards) | {r['matrices']} | {lz['wall']:.1f} s | "
            f"{mib(lz['peak_rss'])} | {mib1(lz['peak_rss'] - lz['base_rss'])} | {mib1(r['bound'])} "
            f"({r['largest'][0]}x{r['largest'][1]}) | {(lz['peak_rss'] - lz['base_rss']) / r['bound']:.2f} | "
            f"{eg_wall} | "
            f"{mib(eg['peak_rss']) if eg else '-'} | "
            f"{str(round(r['ww']['wall'], 1)) + ' s' if 'ww' in r else '-'} | {r['load']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
