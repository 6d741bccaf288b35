"""``layerwise sweep``: short runs over widths × learning rates × weight decays, and whether the optimum moves.

Every width uses the same *base* (lr, wd) grid.  The parametrisation decides how those base values reach
each parameter of a wider model:

* ``sp``         — standard parametrisation: the values are used as they are at every width;
* ``mup``        — μP (init ∝ 1/fan_in, readout × 1/m, matrix lr × 1/m), weight decay unchanged (exponent 0);
* ``mup-sqrtwd`` — μP with matrix weight decay × √m (Fan et al.: λ ∝ √d);
* ``mup-lrwd``   — μP with matrix weight decay × m (mup's MuAdamW: lr·λ constant).

``m = width / base_width``; the base width is the narrowest width of the sweep unless ``--base-width`` says
otherwise.  The **transfer shift** is how many grid steps the best (lr, wd) moves between the narrowest and
the widest model: 0 means the hyper-parameters tuned on the proxy are still the best on the wide model.

At the base width the three μP variants are the same model and the same optimiser (every width factor is 1),
so they share one set of runs, stored under ``mup/``.  Runs are scheduled widest first, so that the long ones
do not end up alone at the tail of a parallel sweep.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from layerwise.lab import runid
from layerwise.lab.config import ConfigError, apply_overrides, resolve
from layerwise.lab.stats import dump_json
from layerwise.lab.stats import sem as _sem_shared
from layerwise.scaling.rules import PARAMETRIZATIONS as _WIDTH_RULES


def _config_overrides(name: str) -> dict:
    """A parametrisation of the library's registry (:data:`layerwise.scaling.PARAMETRIZATIONS`) as config
    overrides: ``sp`` -> no width rule; the μP variants -> ``model.parametrization = "mup"`` plus their
    ``WidthScaling`` options as ``optim.*`` fields."""
    rule = _WIDTH_RULES[name]
    if rule is None:
        return {"model.parametrization": "sp"}
    return {"model.parametrization": "mup", **{f"optim.{k}": v for k, v in rule.items()}}


#: name -> config overrides, one per parametrisation of the library's registry
PARAMETRIZATIONS = {name: _config_overrides(name) for name in _WIDTH_RULES}
HEAD_DIM = 32
FFN_RATIO = 2.75


def width_overrides(width: int, base_width: int) -> dict:
    if width % HEAD_DIM:
        raise ConfigError(f"sweep: width {width} must be a multiple of the head size {HEAD_DIM}")
    ffn = int(round(width * FFN_RATIO / 8)) * 8
    return {
        "model.hidden_size": width,
        "model.intermediate_size": ffn,
        "model.num_heads": width // HEAD_DIM,
        "model.num_kv_heads": width // HEAD_DIM,
        "model.base_hidden_size": base_width,
    }


def run_key(param: str, width: int, base_width: int) -> str:
    """The parametrization whose runs stand for ``param`` at ``width``: at the base width every μP variant is
    plain μP (the decay exponent multiplies by (width/base)^e = 1), so they share ``mup``'s runs."""
    if width == base_width and PARAMETRIZATIONS[param]["model.parametrization"] == "mup":
        return "mup"
    return param


def run_dir(out: Path, param: str, width: int, lr: float, wd: float, seed: int) -> Path:
    return out / param / f"w{width}" / f"lr{lr:g}_wd{wd:g}" / f"seed{seed}"


def sweep(
    preset: str | None,
    widths: list[int],
    lrs: list[float],
    wds: list[float],
    parametrizations: list[str],
    out: str | Path,
    *,
    seeds: int = 1,
    base_width: int | None = None,
    jobs: int = 1,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run the grid into ``out`` (a finished run is reused only when its recorded config and data equal this
    sweep's: see :func:`layerwise.lab.experiments.plan`) and write ``sweep.md``, ``sweep.json``, heatmaps."""
    from layerwise.lab.experiments import _DataCache, execute, plan

    out = Path(out)
    for p in parametrizations:
        if p not in PARAMETRIZATIONS:
            raise ConfigError(f"sweep: unknown parametrization {p!r}; choose from {sorted(PARAMETRIZATIONS)}")
    if not widths or not lrs or not wds:
        raise ConfigError("sweep: --widths, --lrs and --wds must each list at least one value")
    widths, lrs, wds = sorted(widths), sorted(lrs), sorted(wds)
    base_width = base_width or widths[0]
    base = runid.absolute_paths(resolve(preset, config_file, overrides))
    datas = _DataCache(verbose=not quiet)
    datas(base)  # once, before the pool
    runs, seen = [], set()
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else base.train.num_threads
    for w in sorted(widths, reverse=True):  # widest (slowest) first
        for p in parametrizations:
            key = run_key(p, w, base_width)
            for lr in lrs:
                for wd in wds:
                    for seed in range(seeds):
                        path = run_dir(out, key, w, lr, wd, seed)
                        if path in seen:
                            continue
                        seen.add(path)
                        cfg = apply_overrides(
                            base.copy(),
                            {
                                **PARAMETRIZATIONS[key],
                                **width_overrides(w, base_width),
                                "optim.lr": lr,
                                "optim.weight_decay": wd,
                                "train.seed": seed,
                                "train.progress": False,
                                "train.tensorboard": False,
                                "train.num_threads": threads,
                            },
                        )
                        runs.append((f"{key}/w{w}/lr{lr:g}_wd{wd:g}", seed, cfg, path))
    todo = plan(runs, datas, overwrite, what="sweep", quiet=True)
    if not quiet:
        total = len(runs)
        print(f"sweep: {total} runs, {total - len(todo)} already complete, {len(todo)} to run with {jobs} job(s)")
    execute(todo, jobs, datas, quiet=quiet, describe=lambda s: f"val loss {s['final_val_loss']:.4f}")
    return summarize_sweep(out, parametrizations, widths, lrs, wds, seeds, base_width=base_width, quiet=quiet)


def _cells(out: Path, p: str, w: int, lrs, wds, seeds, base_width: int) -> list[list[list[float]]]:
    """Final validation losses per (lr, wd) cell, one entry per finished seed (diverged runs: inf)."""
    p = run_key(p, w, base_width)
    g = []
    for lr in lrs:
        row = []
        for wd in wds:
            vals = []
            for s in range(seeds):
                f = run_dir(out, p, w, lr, wd, s) / "summary.json"
                if f.exists():
                    v = json.loads(f.read_text())["final_val_loss"]
                    vals.append(v if v is not None and math.isfinite(v) else float("inf"))
            row.append(vals)
        g.append(row)
    return g


def _mean_grid(cells: list[list[list[float]]]) -> list[list[float]]:
    """Mean final validation loss per (lr, wd) cell over the finished seeds (NaN where none finished)."""
    return [[sum(v) / len(v) if v else float("nan") for v in row] for row in cells]


def _sem(vals: list[float]) -> float:
    """Standard error over seeds (NaN below two seeds or with a diverged run): the helper compare uses."""
    return _sem_shared(vals)


def _fmt_best(b: dict[str, float]) -> str:
    """A table cell for one width's best cell: ``(lr, wd) loss ± s.e.`` (no ± without an s.e.)."""
    se = b["sem"]
    return f"({b['lr']:g}, {b['wd']:g}) {b['val_loss']:.4f}" + (f" ± {se:.4f}" if se == se else "")


def _argmin(g: list[list[float]]) -> tuple[int, int]:
    best, arg = float("inf"), (0, 0)
    for i, row in enumerate(g):
        for j, v in enumerate(row):
            if v == v and v < best:
                best, arg = v, (i, j)
    return arg


def summarize_sweep(
    out: Path, parametrizations, widths, lrs, wds, seeds, base_width: int | None = None, quiet=False
) -> dict:
    base_width = base_width or widths[0]
    result: dict = {
        "widths": widths,
        "lrs": lrs,
        "wds": wds,
        "seeds": seeds,
        "base_width": base_width,
        "parametrizations": {},
    }
    lines = [
        "| parametrization | "
        + " | ".join(f"best (lr, wd) @ w={w}" for w in widths)
        + " | shift lr steps | shift wd steps | loss at proxy's optimum − best, widest |"
        + (
            " shift (lr, wd) per seed | proxy cells tied with its best | their mean loss − best, widest |"
            if seeds > 1
            else ""
        ),
        "|---|" + "---|" * len(widths) + "---|---|---|" + ("---|---|---|" if seeds > 1 else ""),
    ]
    for p in parametrizations:
        cells = {w: _cells(out, p, w, lrs, wds, seeds, base_width) for w in widths}
        grids = {w: _mean_grid(cells[w]) for w in widths}
        sems = {w: [[_sem(v) for v in row] for row in cells[w]] for w in widths}
        best = {w: _argmin(grids[w]) for w in widths}
        (i0, j0), (i1, j1) = best[widths[0]], best[widths[-1]]
        g_wide = grids[widths[-1]]
        regret = g_wide[i0][j0] - g_wide[i1][j1]
        # the proxy's argmin is noisy when its landscape is flat: also score every proxy cell that ties with
        # its best within the noise band (2 x the median standard error of the proxy grid; needs seeds >= 2)
        ses = sorted(v for row in sems[widths[0]] for v in row if v == v)
        band = 2 * ses[len(ses) // 2] if ses else 0.0
        g0 = grids[widths[0]]
        ties = [
            (i, j)
            for i in range(len(lrs))
            for j in range(len(wds))
            if g0[i][j] == g0[i][j] and g0[i][j] <= g0[i0][j0] + band
        ]
        regret_ties = sum(g_wide[i][j] for i, j in ties) / len(ties) - g_wide[i1][j1]
        per_seed = []  # the shift each seed alone would report: how robust the argmin is
        for sd in range(seeds):
            one = {w: [[v[sd] if len(v) > sd else float("nan") for v in row] for row in cells[w]] for w in widths}
            (a0, b0), (a1, b1) = _argmin(one[widths[0]]), _argmin(one[widths[-1]])
            per_seed.append((a1 - a0, b1 - b0))
        result["parametrizations"][p] = {
            "grids": {str(w): grids[w] for w in widths},
            "sem": {str(w): sems[w] for w in widths},
            "best": {
                str(w): {
                    "lr": lrs[best[w][0]],
                    "wd": wds[best[w][1]],
                    "val_loss": grids[w][best[w][0]][best[w][1]],
                    "sem": sems[w][best[w][0]][best[w][1]],
                }
                for w in widths
            },
            "shift_lr": i1 - i0,
            "shift_wd": j1 - j0,
            "regret": regret,
            "shift_per_seed": per_seed,
            "tie_band": band,
            "proxy_ties": [[lrs[i], wds[j]] for i, j in ties],
            "regret_ties": regret_ties,
        }
        bests = " | ".join(_fmt_best(b) for b in result["parametrizations"][p]["best"].values())
        row = f"| {p} | {bests} | {i1 - i0:+d} | {j1 - j0:+d} | {regret:+.4f} |"
        if seeds > 1:
            row += " " + ", ".join(f"({a:+d}, {b:+d})" for a, b in per_seed) + " |"
            row += f" {len(ties)} (band {band:.3f}) | {regret_ties:+.4f} |"
        lines.append(row)
    md = "\n".join(lines) + "\n"
    (out / "sweep.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(md)
    dump_json(out / "sweep.json", result)
    plot_sweep(result, out / "plots")
    if not quiet:
        print(md)
        print(f"wrote {out / 'sweep.md'} and heatmaps in {out / 'plots'}")
    return result


def plot_sweep(result: dict, plots: Path) -> None:
    """One heatmap per width on one shared colour scale (clipped at best + 1.0, cells above it drawn at the
    top colour and labelled with their value), each cell annotated, the best cell starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots.mkdir(parents=True, exist_ok=True)
    widths, lrs, wds = result["widths"], result["lrs"], result["wds"]
    seeds = result.get("seeds", 1)
    for p, r in result["parametrizations"].items():
        fig, axes = plt.subplots(
            1,
            len(widths),
            figsize=(0.9 * len(wds) * len(widths) + 2.6, 0.55 * len(lrs) + 2.4),
            squeeze=False,
            layout="constrained",
        )
        finite = [v for g in r["grids"].values() for row in g for v in row if v == v and v != float("inf")]
        vmin, vmax = (min(finite), min(max(finite), min(finite) + 1.0)) if finite else (0, 1)
        for ax, w in zip(axes[0], widths):
            g = np.array(r["grids"][str(w)], dtype=float)
            im = ax.imshow(
                np.clip(g, vmin, vmax), cmap="viridis_r", vmin=vmin, vmax=vmax, origin="lower", aspect="auto"
            )
            for i in range(len(lrs)):
                for j in range(len(wds)):
                    v = g[i, j]
                    txt = "n/a" if v != v else ("div." if v == float("inf") else f"{v:.3f}")
                    ax.text(
                        j,
                        i,
                        txt,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="k" if v != v or v < (vmin + vmax) / 2 else "w",
                    )  # NaN cells are blank
            b = r["best"][str(w)]
            if b["val_loss"] is not None and b["val_loss"] == b["val_loss"]:
                ax.scatter([wds.index(b["wd"]) + 0.32], [lrs.index(b["lr"]) + 0.3], marker="*", s=140, c="red")
            ax.set_title(f"{p}, width {w}", fontsize=9)
            ax.set_xticks(range(len(wds)), [f"{x:g}" for x in wds], fontsize=8)
            ax.set_yticks(range(len(lrs)), [f"{x:g}" for x in lrs], fontsize=8)
            ax.set_xlabel("base weight decay λ")
            if ax is axes[0][0]:
                ax.set_ylabel("base learning rate")
        fig.colorbar(im, ax=axes[0].tolist(), label=f"final val loss (mean of {seeds} seed{'s' if seeds > 1 else ''})")
        fig.suptitle(f"{p}: red star = best cell per width", fontsize=9)
        fig.savefig(plots / f"landscape_{p}.png", dpi=100)
        plt.close(fig)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"sweep: cannot read a number list from {text!r}") from e


def cmd_sweep(args) -> int:
    sweep(
        args.preset,
        [int(x) for x in _floats(args.widths)],
        _floats(args.lrs),
        _floats(args.wds),
        [p.strip() for p in args.parametrization.split(",")],
        args.out or f"runs/sweep-{args.preset or 'custom'}",
        seeds=args.seeds,
        base_width=args.base_width,
        jobs=args.jobs,
        config_file=args.config,
        overrides=args.overrides,
        overwrite=args.overwrite,
    )
    return 0


def register(sub) -> None:
    from layerwise.lab.cli import add_command, add_config_args, add_runs_folder_args

    p = add_command(sub, "sweep", "widths × lr × wd grid; optimum transfer across widths", __doc__)
    add_config_args(p, "quick", "override one config value for every run (repeatable), e.g. --set train.max_steps=300")
    p.add_argument("--widths", required=True, help="hidden sizes, e.g. 64,128,256 (multiples of 32)")
    p.add_argument("--lrs", required=True, help="base learning rates, e.g. 1e-3,3e-3,1e-2")
    p.add_argument("--wds", required=True, help="base weight decays, e.g. 0,0.05,0.1,0.2")
    p.add_argument(
        "--parametrization",
        default="mup-sqrtwd",
        help="comma-separated, from: " + ", ".join(PARAMETRIZATIONS) + " (default: mup-sqrtwd)",
    )
    p.add_argument(
        "--base-width",
        type=int,
        default=None,
        help="the width the base lr/wd are tuned at (default: the narrowest of --widths)",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per cell (default 1: no standard errors)")
    add_runs_folder_args(p, "sweep")
    p.set_defaults(func=cmd_sweep)
