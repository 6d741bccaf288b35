"""Experiments: ``compare`` (methods × seeds, paired against the first method).

Seed k gives every method the same initial weights and the same batch order, so besides each method's mean
± standard error over seeds the table reports the **paired difference** from the first method (per-seed
difference, mean ± standard error): at CPU scale the seed-to-seed spread of the final loss is larger than the
effects the papers report, and only paired differences resolve them.

Runs are resumable: a finished run (``summary.json`` present, same resolved config) is skipped, an
interrupted one continues from its checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path

from layerwise.lab import methods
from layerwise.lab.config import Config, apply_overrides, resolve, to_toml
from layerwise.lab.data import prepare
from layerwise.lab.train import train


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    if not xs:
        return float("nan"), float("nan")
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return m, se


def run_name(spec: str) -> str:
    return re.sub(r"[^\w\-+.=]+", "_", spec).strip("_")


def method_config(base: Config, spec: str, seed: int) -> Config:
    cfg = base.copy()
    apply_overrides(cfg, methods.method_overrides(spec))
    cfg.train.seed = seed
    return cfg


def compare(preset: str | None, method_specs: list[str], seeds: int, out: str | Path, *,
            config_file: str | None = None, overrides: list[str] | None = None, seed_offset: int = 0,
            quiet: bool = False, jobs: int = 1) -> dict:
    """Run every method × seed into ``out/<method>/seed<k>`` and write ``out/results.{md,json}`` and plots."""
    out = Path(out)
    if not method_specs:
        raise ValueError("compare: --methods is empty")
    if seeds < 1:
        raise ValueError(f"compare: --seeds must be >= 1, got {seeds}")
    base = resolve(preset, config_file, overrides)
    for spec in method_specs:  # validate every spec before spending time on runs
        method_config(base, spec, 0)
    data = prepare(base.data.corpus, base.data.vocab_size, base.data.valid, verbose=not quiet)
    if jobs > 1:  # share the cores: one torch thread per job unless the config says otherwise
        base.train.num_threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = []
    for seed in range(seed_offset, seed_offset + seeds):
        for spec in method_specs:
            cfg = method_config(base, spec, seed)
            run_dir = out / run_name(spec) / f"seed{seed}"
            summary_path = run_dir / "summary.json"
            cfg_text = to_toml(cfg)
            if summary_path.exists() and (run_dir / "config.toml").exists():
                done_cfg = (run_dir / "config.toml").read_text()
                if done_cfg == cfg_text or _same_after_resolution(done_cfg, cfg):
                    if not quiet:
                        print(f"[skip] {spec} seed {seed}: already complete")
                    continue
            todo.append((spec, seed, cfg, run_dir))
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        cfg_jobs = [(cfg.to_dict(), str(run_dir)) for _, _, cfg, run_dir in todo]
        if not quiet:
            print(f"running {len(todo)} runs, {jobs} at a time")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            for (spec, seed, _, run_dir), s in zip(todo, ex.map(_train_job, cfg_jobs)):
                if not quiet:
                    print(f"[done] {spec} seed {seed}: final val loss {s['final_val_loss']:.4f}  "
                          f"ppl {s['final_val_ppl']:.2f}  {s['wall_s']:.0f}s")
    else:
        for spec, seed, cfg, run_dir in todo:
            if not quiet:
                print(f"[run ] {spec} seed {seed} -> {run_dir}")
            s = train(cfg, run_dir, resume=True, data=data, quiet=quiet)
            if not quiet:
                print(f"       final val loss {s['final_val_loss']:.4f}  ppl {s['final_val_ppl']:.2f}  "
                      f"{s['wall_s']:.0f}s")
    from layerwise.lab.report import report

    return report([out], out, quiet=quiet, method_order=[run_name(s) for s in method_specs])


def _train_job(job: tuple[dict, str]) -> dict:
    """One run in a worker process (``compare --jobs N``)."""
    from layerwise.lab.config import from_dict

    cfg_dict, run_dir = job
    return train(from_dict(cfg_dict), run_dir, resume=True, quiet=True)


def _same_after_resolution(done_cfg: str, cfg: Config) -> bool:
    """A finished run's config equals ``cfg`` once relative widths (``base_hidden_size < 0``) are resolved."""
    from layerwise.lab.config import from_dict, tomllib  # tomllib, or tomli on Python 3.10
    from layerwise.lab.model import model_config

    if cfg.model.base_hidden_size >= 0:
        return False
    probe = cfg.copy()
    hidden = probe.model.hidden_size or model_config(probe.model.size).hidden_size
    methods.resolve_relative_widths(probe, hidden)
    return from_dict(tomllib.loads(done_cfg)).to_dict() == probe.to_dict()


def summarize(runs: dict[str, dict[int, dict]], order: list[str]) -> list[dict]:
    """Rows of the comparison table from {method: {seed: summary}}; paired differences vs ``order[0]``."""
    rows = []
    ref = runs.get(order[0], {}) if order else {}
    for name in order:
        by_seed = runs.get(name, {})
        losses = [s["final_val_loss"] for s in by_seed.values()]
        ppls = [s["final_val_ppl"] for s in by_seed.values()]
        walls = [s["wall_s"] for s in by_seed.values()]
        paired = [by_seed[k]["final_val_loss"] - ref[k]["final_val_loss"] for k in by_seed if k in ref]
        paired_pct = [100 * (by_seed[k]["final_val_ppl"] / ref[k]["final_val_ppl"] - 1) for k in by_seed if k in ref]
        lm, lse = mean_se(losses)
        pm, pse = mean_se(ppls)
        dm, dse = mean_se(paired)
        qm, qse = mean_se(paired_pct)
        rows.append({"method": name, "seeds": len(losses), "val_loss": lm, "val_loss_se": lse, "val_ppl": pm,
                     "val_ppl_se": pse, "paired_dloss": dm, "paired_dloss_se": dse, "paired_dppl_pct": qm,
                     "paired_dppl_pct_se": qse, "wall_s": mean_se(walls)[0]})
    return rows


def markdown_table(rows: list[dict], ref: str) -> str:
    head = (f"| method | seeds | val loss | val ppl | Δ loss vs {ref} (paired) | Δ ppl % (paired) | wall s |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['val_loss']:.4f} ± {r['val_loss_se']:.4f} | "
            f"{r['val_ppl']:.2f} ± {r['val_ppl_se']:.2f} | {r['paired_dloss']:+.4f} ± {r['paired_dloss_se']:.4f} | "
            f"{r['paired_dppl_pct']:+.2f} ± {r['paired_dppl_pct_se']:.2f} | {r['wall_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=lambda o: None))
