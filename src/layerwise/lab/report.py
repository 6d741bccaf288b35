"""Reports from finished runs: comparison tables (mean ± s.e., paired differences), loss curves, and the
per-module alpha / weight-decay history of a decay controller (from ``spectral.jsonl``)."""
from __future__ import annotations

import json
from pathlib import Path

from layerwise.lab.experiments import dump, markdown_table, summarize


def find_runs(paths: list[Path]) -> dict[str, dict[int, Path]]:
    """{method: {seed: run_dir}} for run directories found at or below ``paths``.

    A run directory holds ``summary.json``.  Its method is the name of its parent folder when that folder
    is a ``compare`` layout (``<method>/seed<k>``), else the run directory's own name.
    """
    runs: dict[str, dict[int, Path]] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"report: {root} does not exist")
        for summary in sorted(root.rglob("summary.json")):
            run = summary.parent
            seed = json.loads(summary.read_text()).get("seed", 0)
            method = run.parent.name if run.name.startswith("seed") and run != root else run.name
            runs.setdefault(method, {})[seed] = run
    return runs


def _read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def report(paths: list[str | Path], out: str | Path, *, quiet: bool = False,
           method_order: list[str] | None = None) -> dict:
    """Write ``results.md``/``results.json`` and ``plots/`` under ``out``; returns {"rows", "markdown"}."""
    out = Path(out)
    found = find_runs([Path(p) for p in paths])
    if method_order is None:  # keep the order (and so the paired reference) of an earlier compare's table
        for p in [out, *map(Path, paths)]:
            prev = Path(p) / "results.json"
            if prev.exists():
                method_order = [r["method"] for r in json.loads(prev.read_text()).get("rows", [])]
                break
    if not found:
        raise FileNotFoundError(f"report: no finished runs (summary.json) under {', '.join(map(str, paths))}")
    order = [m for m in (method_order or []) if m in found] + sorted(m for m in found if m not in (method_order or []))
    summaries = {m: {s: json.loads((r / "summary.json").read_text()) for s, r in seeds.items()}
                 for m, seeds in found.items()}
    rows = summarize(summaries, order)
    md = markdown_table(rows, order[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    dump(out / "results.json", {"rows": rows, "runs": {m: {str(s): str(r) for s, r in v.items()}
                                                       for m, v in found.items()}})
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    for i, m in enumerate(order):
        color = cmap(i % cmap.N)
        train_curves, val_curves = [], []
        for run in found[m].values():
            recs = _read_metrics(run)
            train_curves.append({r["step"]: r["loss"] for r in recs if r.get("loss") is not None})
            val_curves.append({r["step"]: r["val_loss"] for r in recs if r.get("val_loss") is not None})
        for ax, curves in ((axes[0], train_curves), (axes[1], val_curves)):
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
            if not steps:
                continue
            ys = np.array([[c[s] for s in steps] for c in curves])
            mean = ys.mean(0)
            ax.plot(steps, mean, color=color, label=f"{m} (n={len(curves)})", marker="o" if ax is axes[1] else None)
            if len(curves) > 1:
                se = ys.std(0, ddof=1) / np.sqrt(len(curves))
                ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.2)
    axes[0].set(title="training loss (mean over seeds)", xlabel="step", ylabel="loss")
    axes[1].set(title="validation loss (mean ± s.e.)", xlabel="step", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # zoom the training curve on its second half, where methods differ
    ys_all = [ln.get_ydata() for ln in axes[0].get_lines()]
    if ys_all:
        tail = np.concatenate([y[len(y) // 3:] for y in ys_all])
        axes[0].set_ylim(tail.min() - 0.05, tail.max() + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decay_history(run: Path, path: Path) -> None:
    """alpha per layer × module type over training, and the decay each module received."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import torch

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

    layers = sorted({where(r["name"])[0] for r in last["rows"] if where(r["name"])[0] is not None})
    has_alpha = any(r.get("alpha") is not None for r in last["rows"])
    ncols = 3 if has_alpha else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    axes = np.atleast_1d(axes)

    def grid(rec, key):
        g = np.full((len(layers), len(types)), np.nan)
        for r in rec["rows"]:
            li, mt = where(r["name"])
            if li in layers and mt in types and r.get(key) is not None:
                g[layers.index(li), types.index(mt)] = r[key]
        return g

    panels = ([("alpha", first, f"alpha at step {first['step']}"), ("alpha", last, f"alpha at step {last['step']}")]
              if has_alpha else [])
    panels.append(("weight_decay", last, f"weight decay from step {last['step']}"))
    for ax, (key, rec, title) in zip(axes, panels):
        im = ax.imshow(grid(rec, key), aspect="auto", cmap="viridis")
        ax.set(title=title, xticks=range(len(types)), yticks=range(len(layers)), ylabel="layer")
        ax.set_xticklabels(types)
        ax.set_yticklabels(layers)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{run.parent.name}/{run.name}: {recs[0].get('controller', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
