"""Reports from finished runs: comparison tables (mean ± s.e., paired differences), loss curves, and the
per-module alpha / weight-decay history of a decay controller (from ``spectral.jsonl``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from layerwise.lab.experiments import dump, markdown_table, summarize


def find_runs(paths: list[Path]) -> dict[str, dict[int, Path]]:
    """{method: {seed: run_dir}} for run directories found at or below ``paths``.

    A run directory holds ``summary.json``.  Its method is the name of its parent folder when that folder
    is a ``compare`` layout (``<method>/seed<k>``), else the run directory's own name.  Runs of different
    experiments (folders holding the method folders) are kept apart: when a method name occurs in more than
    one experiment, every method is named ``<experiment>/<method>``; two runs that still share a method and a
    seed are an error naming both.
    """
    entries = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"report: {root} does not exist")
        for summary in sorted(root.rglob("summary.json")):
            run = summary.parent
            seed = json.loads(summary.read_text()).get("seed", 0)
            if run.name.startswith("seed") and run != root:
                method, exp = run.parent.name, run.parent.parent
            else:
                method, exp = run.name, run.parent
            entries.append((exp.resolve(), method, seed, run))
    exps: dict[str, set] = {}
    for exp, method, _, _ in entries:
        exps.setdefault(method, set()).add(exp)
    label = {}
    if any(len(v) > 1 for v in exps.values()):
        all_exps = sorted({e for e, *_ in entries})
        common = Path(os.path.commonpath([str(e) for e in all_exps])) if len(all_exps) > 1 else all_exps[0].parent
        label = {e: (str(e.relative_to(common)) if e != common else e.name) for e in all_exps}
    runs: dict[str, dict[int, Path]] = {}
    for exp, method, seed, run in entries:
        key = f"{label[exp]}/{method}" if label else method
        prev = runs.setdefault(key, {}).get(seed)
        if prev is not None and prev.resolve() != run.resolve():
            raise ValueError(f"report: two runs of {key!r} seed {seed}: {prev} and {run}; report them separately")
        runs[key][seed] = run
    return runs


def _read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def report(
    paths: list[str | Path],
    out: str | Path,
    *,
    quiet: bool = False,
    method_order: list[str] | None = None,
    ref: str | None = None,
    notes: list[str] | None = None,
) -> dict:
    """Write ``results.md``/``results.json`` and ``plots/`` under ``out``; returns {"rows", "markdown"}.

    Paired differences are taken against ``ref`` (an error if no such method was found), else against the
    first of ``method_order``, else the order of an earlier report in ``out``, else the first name.
    ``notes`` are printed under the table.
    """
    out = Path(out)
    found = find_runs([Path(p) for p in paths])
    if ref is not None and ref not in found:
        raise ValueError(f"report: --ref {ref!r} is not among the methods found: {', '.join(sorted(found)) or 'none'}")
    if method_order is None:  # keep the order (and so the paired reference) of an earlier compare's table
        for p in [out, *map(Path, paths)]:
            prev = Path(p) / "results.json"
            if prev.exists():
                method_order = [r["method"] for r in json.loads(prev.read_text()).get("rows", [])]
                break
    if not found:
        raise FileNotFoundError(f"report: no finished runs (summary.json) under {', '.join(map(str, paths))}")
    order = [m for m in (method_order or []) if m in found] + sorted(m for m in found if m not in (method_order or []))
    if ref is not None:
        order = [ref] + [m for m in order if m != ref]
    summaries = {
        m: {s: json.loads((r / "summary.json").read_text()) for s, r in seeds.items()} for m, seeds in found.items()
    }
    rows = summarize(summaries, order)
    md = markdown_table(rows, order[0])
    from layerwise.lab.downstream import eval_markdown, eval_rows

    eval_cols, eval_stats = eval_rows(found, order, warn=lambda msg: quiet or print(msg))
    for r in rows if eval_cols else ():  # downstream (lm-eval) columns, when the runs have eval.json
        r["eval"] = eval_stats.get(r["method"], {})
    md += eval_markdown(eval_cols, eval_stats, order)
    n_seeds = {r["seeds"] for r in rows}
    if n_seeds == {1}:
        md += (
            "\nOne seed per method: no standard errors (n/a). At this scale the seed-to-seed spread is "
            "larger than most effects; use `layerwise compare --seeds 3` for conclusions.\n"
        )
    md += (
        "\nCPU s: each run's own CPU time (all its threads), mean over seeds; unlike wall time it does not "
        "depend on what else ran at the same time.\n"
    )
    for n in notes or []:
        md += f"\n{n}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    dump(
        out / "results.json",
        {"rows": rows, "runs": {m: {str(s): str(r) for s, r in v.items()} for m, v in found.items()}},
    )
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_loss_curves(found, order, plots / "loss_curves.png")
    for m, seeds in found.items():
        for s, run in seeds.items():
            if (run / "spectral.jsonl").exists():
                plot_decay_history(run, plots / f"decay_{m}_seed{s}.png")
    if not quiet:
        print(md)
        print(f"wrote {out / 'results.md'} and plots in {plots}")
    return {"rows": rows, "markdown": md}


def plot_loss_curves(found: dict[str, dict[int, Path]], order: list[str], path: Path) -> None:
    """Training loss (all logged steps, full range and a labelled zoom on the last two thirds) and validation
    loss at the evaluation steps (marked), mean over seeds with a ± s.e. band where n ≥ 2; n per method in
    the legend, which sits outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    ns, eval_steps, max_step = set(), set(), 0
    zoom_vals = []
    for i, m in enumerate(order):
        color = cmap(i % cmap.N)
        train_curves, val_curves = [], []
        for run in found[m].values():
            recs = _read_metrics(run)
            train_curves.append({r["step"]: r["loss"] for r in recs if r.get("loss") is not None})
            val_curves.append({r["step"]: r["val_loss"] for r in recs if r.get("val_loss") is not None})
        ns.add(len(train_curves))
        for k, curves in ((0, train_curves), (2, val_curves)):
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
            if not steps:
                continue
            ys = np.array([[c[s] for s in steps] for c in curves])
            mean = ys.mean(0)
            label = f"{m} (n={len(curves)})" if k == 0 else None
            targets = (axes[0], axes[1]) if k == 0 else (axes[2],)
            se = ys.std(0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
            for ax in targets:
                ax.plot(
                    steps,
                    mean,
                    color=color,
                    label=label if ax is axes[0] else None,
                    marker="o" if k == 2 else None,
                    ms=5,
                )
                if len(curves) > 1:
                    ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.2, lw=0)
            if k == 0:
                max_step = max(max_step, steps[-1])
                tail = [j for j, s in enumerate(steps) if s >= steps[-1] / 3]
                zoom_vals += [mean[tail] - se[tail], mean[tail] + se[tail]]
            else:
                eval_steps.update(steps)
    if len(ns) == 1:
        n = next(iter(ns))
        n_txt = f"n={n} seed{'s' if n != 1 else ''} each"
    else:
        n_txt = "n per method in legend"
    if ns and min(ns) >= 2:
        band = "mean ± s.e."
    elif ns and max(ns) == 1:
        band = "one run per method, no s.e."
    else:
        band = "mean; ± s.e. band where n ≥ 2"
    axes[0].set(title=f"training loss, all steps ({band})", xlabel="step", ylabel="training loss (logged mean)")
    zoom_from = int(max_step / 3)
    axes[1].set(title=f"training loss, zoom: steps ≥ {zoom_from}", xlabel="step", ylabel="training loss")
    if zoom_vals:
        z = np.concatenate(zoom_vals)
        pad = 0.05 * max(z.max() - z.min(), 1e-3)
        axes[1].set_xlim(zoom_from, max_step * 1.01)
        axes[1].set_ylim(z.min() - pad, z.max() + pad)
    axes[2].set(title=f"validation loss at evaluations ({band})", xlabel="step", ylabel="validation loss (full split)")
    for ax in axes:
        ax.grid(alpha=0.3)
        for s in sorted(eval_steps):
            ax.axvline(s, color="0.6", ls=":", lw=0.8)
    if eval_steps:
        axes[2].set_xticks(sorted(eval_steps))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside right upper",
            fontsize=8,
            title=f"method ({n_txt}); dotted: evaluations",
            title_fontsize=8,
        )
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: Shown under the α panels: why attention and MLP differ at initialisation.
SHAPE_NOTE = (
    "At step 0 the weights are random: the attention-vs-MLP difference in α is the shape effect (the α of "
    "a random matrix depends on its aspect ratio; q/k/v/o and gate/up/down have different shapes), not "
    "learned structure. The Δα panel (α now − α at step 0) removes it to first order."
)


def plot_decay_history(run: Path, path: Path) -> None:
    """α per layer × module type at the first and last recomputation (one shared, labelled colour scale), the
    change in α since then, and the weight decay each module received."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    from layerwise.anatomy import anatomy

    recs = [json.loads(ln) for ln in (run / "spectral.jsonl").read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if r.get("kind") == "decay" and r.get("rows")]
    if not recs:
        return
    types = ["q", "k", "v", "o", "gate", "up", "down"]
    first, last = recs[0], recs[-1]
    # block index and operator of each logged name, from the names alone (the rows are the analysed matrices)
    an = anatomy({r["name"]: torch.empty(2, 2, device="meta") for rec in recs for r in rec["rows"]})

    def where(name: str) -> tuple[int | None, str | None]:
        info = an.get(name)
        return (info.block, info.operator) if info is not None else (None, None)

    layers = sorted({b for b in (where(r["name"])[0] for r in last["rows"]) if b is not None})
    has_alpha = any(r.get("alpha") is not None for r in last["rows"])
    ncols = 4 if has_alpha else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 1.9 + 0.45 * len(layers)), layout="constrained")
    axes = np.atleast_1d(axes)

    def grid(rec, key):
        g = np.full((len(layers), len(types)), np.nan)
        for r in rec["rows"]:
            li, mt = where(r["name"])
            if li in layers and mt in types and r.get(key) is not None:
                g[layers.index(li), types.index(mt)] = r[key]
        return g

    def draw(ax, g, title, cmap, vmin, vmax, fmt):
        im = ax.imshow(g, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set(title=title, xticks=range(len(types)), yticks=range(len(layers)), xlabel="module type", ylabel="layer")
        ax.set_xticklabels(types)
        ax.set_yticklabels(layers)
        if g.size <= 400:
            for i in range(g.shape[0]):
                for j in range(g.shape[1]):
                    if np.isfinite(g[i, j]):
                        r, gr, b, _ = im.cmap(im.norm(g[i, j]))
                        ax.text(
                            j,
                            i,
                            fmt.format(g[i, j]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="w" if 0.299 * r + 0.587 * gr + 0.114 * b < 0.5 else "k",
                        )
        return im

    controller = recs[0].get("controller", "")
    wd = grid(last, "weight_decay")
    if has_alpha:
        a0, a1 = grid(first, "alpha"), grid(last, "alpha")
        both = np.concatenate([a0[np.isfinite(a0)], a1[np.isfinite(a1)]])
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        im = draw(axes[0], a0, f"α at step {first['step']}", "viridis", lo, hi, "{:.2f}")
        draw(axes[1], a1, f"α at step {last['step']}", "viridis", lo, hi, "{:.2f}")
        fig.colorbar(im, ax=axes[:2].tolist(), label="α (one scale for both panels)", shrink=0.9)
        d = a1 - a0
        m = float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 1.0
        im = draw(axes[2], d, f"Δα = α(step {last['step']}) − α(step {first['step']})", "RdBu_r", -m, m, "{:+.2f}")
        fig.colorbar(im, ax=axes[2], label="Δα since step " + str(first["step"]), shrink=0.9)
        wax = axes[3]
        fig.text(0.01, 0.005, SHAPE_NOTE, fontsize=7, ha="left", va="bottom", wrap=True)
    else:
        wax = axes[0]
    fin = wd[np.isfinite(wd)]
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    im = draw(wax, wd, f"weight decay λ from step {last['step']}", "viridis", lo, hi, "{:.3g}")
    fig.colorbar(im, ax=wax, label="weight decay λ (coupled, per module)", shrink=0.9)
    fig.suptitle(f"{run.parent.name}/{run.name}: {controller}")
    engine = fig.get_layout_engine()
    if has_alpha and isinstance(engine, ConstrainedLayoutEngine):  # the figure is made with layout="constrained"
        engine.set(rect=(0, 0.06, 1, 0.94))
    fig.savefig(path, dpi=100)
    plt.close(fig)
