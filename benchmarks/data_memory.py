"""Peak memory and throughput of ``layerwise data prepare`` on a large generated JSONL.

Writes a JSONL of ``--gb`` GB of generated English-like documents into a temporary folder, trains a byte-level
BPE tokenizer on its first 20 MB (saved as a ``tokenizer.json``: the run below then uses it as a *pretrained*
tokenizer, so the measurement is the streaming pipeline, not BPE training), prepares the corpus with
``--num-proc`` workers, and samples the resident memory of the whole process tree (main + workers, from
/proc) every 0.2 s.  Everything it wrote is deleted afterwards.

    PYTHONPATH=src python benchmarks/data_memory.py --gb 1 --num-proc 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more out up into do any "
    "time about than other some could them these two may first then only new people like over such our man "
    "me even most made after also did many before must through back years where much your way well down "
    "should because each just those how too little state good very make world still own see men work long "
    "get here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three"
).split()


def rss_tree(pid: int) -> int:
    """Sum of VmRSS (bytes) of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def make_jsonl(path: Path, gb: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    target = int(gb * 1e9)
    n = 0
    with open(path, "w") as f:
        while f.tell() < target:
            lines = []
            for _ in range(1000):
                words = rng.choices(WORDS, k=rng.randint(50, 400))
                lines.append(json.dumps({"text": " ".join(words).capitalize() + "."}))
            f.write("\n".join(lines) + "\n")
            n += 1000
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lw_data_mem"))
    os.environ["LAYERWISE_CACHE"] = str(tmp / "cache")
    try:
        t0 = time.perf_counter()
        docs = make_jsonl(tmp / "big.jsonl", args.gb)
        size = (tmp / "big.jsonl").stat().st_size
        print(f"generated {size / 1e9:.2f} GB, {docs:,} documents in {time.perf_counter() - t0:.0f}s")
        from layerwise.lab.data import train_tokenizer
        from layerwise.lab.sources import _jsonl_texts

        sample, n = [], 0
        for t in _jsonl_texts(tmp / "big.jsonl", "text"):
            sample.append(t)
            n += len(t)
            if n > 20e6:
                break
        train_tokenizer(sample, args.vocab).save(str(tmp / "tokenizer.json"))
        del sample
        from layerwise.lab.data import prepare

        peak = {"tree": 0}
        stop = threading.Event()

        def sample_rss() -> None:
            while not stop.is_set():
                peak["tree"] = max(peak["tree"], rss_tree(os.getpid()))
                time.sleep(0.2)

        base = rss_tree(os.getpid())
        th = threading.Thread(target=sample_rss, daemon=True)
        th.start()
        t1 = time.perf_counter()
        td = prepare(
            str(tmp / "big.jsonl"), tokenizer=str(tmp / "tokenizer.json"), num_proc=args.num_proc, verbose=True
        )
        wall = time.perf_counter() - t1
        stop.set()
        th.join()
        import resource

        main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tokens = td.meta["train_tokens"] + td.meta["val_tokens"]
        print(
            json.dumps(
                {
                    "jsonl_gb": round(size / 1e9, 3),
                    "documents": docs,
                    "num_proc": args.num_proc,
                    "tokens": tokens,
                    "shards": len(td.meta["shards"]["train"]) + len(td.meta["shards"]["valid"]),
                    "dtype": td.meta["dtype"],
                    "wall_s": round(wall, 1),
                    "tokens_per_s": round(tokens / wall),
                    "encode_tokens_per_s": round(td.meta["tokens_per_s"]),
                    "peak_rss_tree_mb": round(peak["tree"] / 2**20),
                    "rss_before_mb": round(base / 2**20),
                    "peak_rss_main_mb": round(main_peak / 2**20),
                    "load_avg": os.getloadavg(),
                },
                indent=1,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
