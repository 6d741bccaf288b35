"""Downstream evaluation end to end on CPU: a next-word cloze over the held-out Shakespeare works, scored by
lm-evaluation-harness on every run of a ``compare``.

    PYTHONPATH=src .venv/bin/python benchmarks/downstream_cloze.py [--preset quick] \
        [--methods adamw,multipliers] [--seeds 2] [--items 500] [--out runs/downstream-cloze] [--jobs 1] \
        [--set train.num_threads=1 ...]

Writes the task (``OUT/tasks/shakespeare_cloze.{yaml,jsonl}``: 4-way, distractors drawn by unigram frequency
from the held-out text, so a context-free model is at 0.25), then runs
``layerwise compare --preset P --methods M --seeds S --eval-tasks OUT/tasks/shakespeare_cloze.yaml`` with
``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1`` and prints ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--methods", default="adamw,multipliers")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="runs/downstream-cloze")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from layerwise.lab.cli import main as cli
    from layerwise.lab.config import preset
    from layerwise.lab.data import load_documents
    from layerwise.lab.downstream import write_cloze_task

    cfg = preset(args.preset)
    _, val_docs, info = load_documents(cfg.data.corpus, cfg.data.valid)
    out = Path(args.out)
    yaml, docs = write_cloze_task("\n".join(val_docs), out / "tasks", n_docs=args.items, name="shakespeare_cloze")
    print(f"task {yaml}: {len(docs)} items from the validation split ({info.get('split', '')})")
    rc = cli(
        [
            "compare",
            "--preset",
            args.preset,
            "--methods",
            args.methods,
            "--seeds",
            str(args.seeds),
            "--jobs",
            str(args.jobs),
            "--out",
            str(out),
            "--eval-tasks",
            str(yaml),
            "--eval-device",
            "cpu",
            *[a for o in args.overrides for a in ("--set", o)],
        ]
    )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
