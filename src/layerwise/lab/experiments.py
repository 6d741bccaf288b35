"""Experiments: ``compare`` (methods × seeds, paired against the first method).

Seed k gives every method the same initial weights and the same batch order, so besides each method's mean
± standard error over seeds the table reports the **paired difference** from the first method (per-seed
difference, mean ± standard error): at CPU scale the seed-to-seed spread of the final loss is larger than the
effects the papers report, and only paired differences resolve them.

Runs are resumable: a finished run is reused and an interrupted one continues from its checkpoint, but only
when the run's ``identity.json`` (its resolved config and data fingerprint, :mod:`layerwise.lab.runid`)
equals what this command would produce; otherwise ``compare`` refuses and names what differs (``overwrite``
re-runs those runs).  A result is never printed under a config that did not produce it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from layerwise.lab import methods, runid
from layerwise.lab import stats as _stats
from layerwise.lab.config import Config, apply_overrides, resolve
from layerwise.lab.data import TokenData, prepare_config
from layerwise.lab.train import train


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN for a single value: one seed has no spread to measure)."""
    return _stats.mean_se(xs)


def run_name(spec: str) -> str:
    return re.sub(r"[^\w\-+.=]+", "_", spec).strip("_")


def method_config(base: Config, spec: str, seed: int) -> Config:
    cfg = base.copy()
    apply_overrides(cfg, methods.method_overrides(spec))
    cfg.train.seed = seed
    return cfg


def compare(
    preset: str | None,
    method_specs: list[str],
    seeds: int,
    out: str | Path,
    *,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    seed_offset: int = 0,
    quiet: bool = False,
    jobs: int = 1,
    overwrite: bool = False,
    notes: list[str] | None = None,
    eval_tasks: str | list[str] | None = None,
    eval_options: dict | None = None,
) -> dict:
    """Run every method × seed into ``out/<method>/seed<k>`` and write ``out/results.{md,json}`` and plots.

    With ``eval_tasks`` every finished run is also evaluated on those lm-eval tasks (``layerwise eval``;
    ``eval_options`` are its keyword options), and the report gains their columns."""
    out = Path(out)
    if not method_specs:
        raise ValueError("compare: --methods is empty")
    if seeds < 1:
        raise ValueError(f"compare: --seeds must be >= 1, got {seeds}")
    base = runid.absolute_paths(resolve(preset, config_file, overrides))
    for spec in method_specs:  # validate every spec before spending time on runs
        method_config(base, spec, 0)
    if eval_tasks:  # and the tasks (and that lm-eval is installed) before training
        from layerwise.lab.downstream import parse_tasks, require_lm_eval

        require_lm_eval()
        parse_tasks(eval_tasks, (eval_options or {}).get("include_path", ()))
    if jobs > 1:  # share the cores: one torch thread per job unless the config says otherwise
        base.train.num_threads = max(1, (os.cpu_count() or 1) // jobs)
    runs = [
        (spec, seed, method_config(base, spec, seed), out / run_name(spec) / f"seed{seed}")
        for seed in range(seed_offset, seed_offset + seeds)
        for spec in method_specs
    ]
    datas = _DataCache(verbose=not quiet)
    todo = plan(runs, datas, overwrite, what="compare", quiet=quiet)
    execute(todo, jobs, datas, quiet=quiet)
    if eval_tasks:
        from layerwise.lab.downstream import evaluate_runs

        evaluate_runs(
            [
                out / run_name(spec) / f"seed{seed}"
                for seed in range(seed_offset, seed_offset + seeds)
                for spec in method_specs
            ],
            eval_tasks,
            quiet=quiet,
            **(eval_options or {}),
        )
    from layerwise.lab.report import report

    return report([out], out, quiet=quiet, method_order=[run_name(s) for s in method_specs], notes=notes)


class _DataCache:
    """One prepared token cache entry per distinct data config."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.entries: dict[str, TokenData] = {}

    def __call__(self, cfg: Config):
        key = repr(sorted(vars(cfg.data).items()))
        if key not in self.entries:
            self.entries[key] = prepare_config(cfg.data, verbose=self.verbose)
        return self.entries[key]


def expected_identity(cfg: Config, data) -> dict:
    """The identity a fresh run of ``cfg`` on ``data`` records (relative widths resolved on a copy)."""
    from layerwise.lab.hf_models import uses_hf
    from layerwise.lab.train import resolve_model_config

    probe = runid.absolute_paths(cfg.copy())
    if not uses_hf(probe):  # as the trainer does: an HF model has no relative widths to resolve
        resolve_model_config(probe, data.vocab_size)
    return runid.identity(probe, data)


def plan(runs: list[tuple], datas, overwrite: bool, *, what: str, quiet: bool = False) -> list[tuple]:
    """Decide for each ``(label, seed, cfg, run_dir)``: reuse (finished, same identity), resume (interrupted,
    same identity), or run afresh (new, or ``overwrite`` of a different one).  Runs whose recorded identity
    differs are refused together, each with what differs, unless ``overwrite``.

    Returns ``[(label, seed, cfg, run_dir, mode)]`` to run, ``mode`` in ``"new" | "resume" | "overwrite"``.
    """
    todo, clashes = [], []
    for label, seed, cfg, run_dir in runs:
        if not runid.has_run(run_dir):
            todo.append((label, seed, cfg, run_dir, "new"))
            continue
        diffs = runid.differences(runid.read(run_dir), expected_identity(cfg, datas(cfg)))
        if diffs:
            clashes.append((label, seed, run_dir, diffs))
            todo.append((label, seed, cfg, run_dir, "overwrite"))
        elif (run_dir / "summary.json").exists():
            if not quiet:
                print(f"[skip] {label} seed {seed}: already complete (same config and data)")
        else:
            todo.append((label, seed, cfg, run_dir, "resume"))
    if clashes and not overwrite:
        lines = [f"  {label} seed {seed} ({run_dir}): " + "; ".join(d) for label, seed, run_dir, d in clashes[:12]]
        more = f"\n  ... and {len(clashes) - 12} more" if len(clashes) > 12 else ""
        raise runid.RunDirError(
            f"{what}: {len(clashes)} run(s) already in the output folder were made by a different config or "
            "data than this command's, so their results cannot be reused:\n"
            + "\n".join(lines)
            + more
            + "\nRe-run them with --overwrite, or choose another --out."
        )
    if clashes and not quiet:
        print(f"{what}: re-running {len(clashes)} run(s) whose recorded config or data differ (--overwrite)")
    return todo


def execute(todo: list[tuple], jobs: int, datas, *, quiet: bool = False, describe=None) -> dict[str, dict]:
    """Run ``todo`` (from :func:`plan`), ``jobs`` at a time, under one live status line; returns the summaries
    by run directory.  ``describe(summary)`` gives the text after each "[done]"."""
    from layerwise.lab.progress import RunMonitor, TrainingInterrupted, signal_workers, worker_init

    describe = describe or (lambda s: f"final val loss {s['final_val_loss']:.4f}  ppl {s['final_val_ppl']:.2f}")
    results: dict[str, dict] = {}
    if not todo:
        return results
    labels = [f"{label}/seed{seed}" for label, seed, *_ in todo]
    monitor = RunMonitor(
        [(lab, run_dir, cfg.train.max_steps) for lab, (_, _, cfg, run_dir, _) in zip(labels, todo)], enabled=not quiet
    )
    say = monitor.print if not quiet else (lambda text: None)
    if not quiet:
        print(f"running {len(todo)} run(s), {min(jobs, len(todo))} at a time")
    with monitor:
        if jobs > 1 and len(todo) > 1:
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            ex = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=worker_init)
            futs: dict = {}
            try:
                futs = {
                    ex.submit(_train_job, (cfg.to_dict(), str(run_dir), mode)): (lab, run_dir)
                    for lab, (_, _, cfg, run_dir, mode) in zip(labels, todo)
                }
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        lab, run_dir = futs[f]
                        s = f.result()
                        results[str(run_dir)] = s
                        monitor.done(lab)
                        say(f"[done {len(results)}/{len(todo)}] {lab}: {describe(s)}")
            except KeyboardInterrupt:
                say("stopping: each running run writes a checkpoint after its current step ...")
                signal_workers(ex)
                ex.shutdown(wait=True, cancel_futures=True)
                for f, (lab, _) in futs.items():
                    e = f.exception() if f.done() and not f.cancelled() else None
                    if isinstance(e, TrainingInterrupted) and e.step:
                        say(f"[stop] {lab}: checkpoint at step {e.step}")
                raise KeyboardInterrupt from None
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
        else:
            for lab, (_, _, cfg, run_dir, mode) in zip(labels, todo):
                s = train(
                    cfg, run_dir, resume=mode == "resume", overwrite=mode == "overwrite", data=datas(cfg), quiet=True
                )
                results[str(run_dir)] = s
                monitor.done(lab)
                say(f"[done {len(results)}/{len(todo)}] {lab}: {describe(s)}")
    return results


def _train_job(job: tuple[dict, str, str]) -> dict:
    """One run in a worker process (``compare --jobs N``, ``sweep --jobs N``)."""
    from layerwise.lab.config import from_dict

    cfg_dict, run_dir, mode = job
    return train(from_dict(cfg_dict), run_dir, resume=mode == "resume", overwrite=mode == "overwrite", quiet=True)


def summarize(runs: dict[str, dict[int, dict]], order: list[str]) -> list[dict]:
    """Rows of the comparison table from {method: {seed: summary}}; paired differences vs ``order[0]``.

    A seed is paired only when both runs trained the same number of steps and tokens; standard errors over
    fewer than two values are NaN (n/a), never 0.  ``cpu_s`` is each run's own CPU time (mean over seeds),
    which, unlike wall time, does not depend on what else ran beside it.
    """
    rows = []
    ref = runs.get(order[0], {}) if order else {}

    def same_length(a: dict, b: dict) -> bool:
        return a.get("steps") == b.get("steps") and a.get("tokens") == b.get("tokens")

    for name in order:
        by_seed = runs.get(name, {})
        losses = [s["final_val_loss"] for s in by_seed.values()]
        ppls = [s["final_val_ppl"] for s in by_seed.values()]
        cpus = [s["cpu_s"] for s in by_seed.values() if s.get("cpu_s") is not None]
        pairs = [k for k in by_seed if k in ref and same_length(by_seed[k], ref[k])]
        paired = [by_seed[k]["final_val_loss"] - ref[k]["final_val_loss"] for k in pairs]
        paired_pct = [100 * (by_seed[k]["final_val_ppl"] / ref[k]["final_val_ppl"] - 1) for k in pairs]
        lm, lse = mean_se(losses)
        pm, pse = mean_se(ppls)
        dm, dse = mean_se(paired)
        qm, qse = mean_se(paired_pct)
        rows.append(
            {
                "method": name,
                "seeds": len(losses),
                "val_loss": lm,
                "val_loss_se": lse,
                "val_ppl": pm,
                "val_ppl_se": pse,
                "paired_dloss": dm,
                "paired_dloss_se": dse,
                "paired_dppl_pct": qm,
                "paired_dppl_pct_se": qse,
                "paired_seeds": len(pairs),
                "is_ref": name == order[0],
                "cpu_s": mean_se(cpus)[0] if cpus else float("nan"),
                "wall_s": mean_se([s["wall_s"] for s in by_seed.values()])[0],
            }
        )
    return rows


def markdown_table(rows: list[dict], ref: str) -> str:
    head = (
        f"| method | seeds | val loss | val ppl | Δ loss vs {ref} (paired) | Δ ppl % (paired) | CPU s |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    pm = _stats.fmt_pm
    lines = []
    for r in rows:
        if r.get("is_ref"):
            dl = dp = "(reference)"
        elif not r.get("paired_seeds", 1):
            dl = dp = "n/a (no seed of equal length)"
        else:
            dl, dp = (
                pm(r["paired_dloss"], r["paired_dloss_se"], 4, True),
                pm(r["paired_dppl_pct"], r["paired_dppl_pct_se"], 2, True),
            )
        cpu = r.get("cpu_s")
        cpu = (f"{cpu:.1f}" if cpu < 100 else f"{cpu:.0f}") if isinstance(cpu, float) and cpu == cpu else "n/a"
        lines.append(
            f"| {r['method']} | {r['seeds']} | {pm(r['val_loss'], r['val_loss_se'])} | "
            f"{pm(r['val_ppl'], r['val_ppl_se'], 2)} | {dl} | {dp} | {cpu} |"
        )
    return head + "\n".join(lines) + "\n"


def dump(path: Path, obj) -> None:
    _stats.dump_json(path, obj)
