"""``layerwise analyze PATH``: HT-SR spectral analysis of a run, a checkpoint or a Hugging Face model folder.

PATH may be

* a run directory (reads ``RUN/checkpoints/last.pt``: a ``torch.save``'d dict whose ``"model"`` key is the
  state dict);
* a ``.pt`` / ``.pth`` / ``.bin`` file: such a dict (``"model"`` or ``"state_dict"`` key) or a raw state dict;
* a ``.safetensors`` file;
* a local Hugging Face model folder (``model.safetensors``, sharded ``model-*.safetensors``, or
  ``pytorch_model.bin`` / ``pytorch_model-*.bin``).

Checkpoints are loaded with ``torch.load(..., weights_only=True, map_location="cpu")``.  The command prints a
table, writes ``spectral.json`` and plots (``plots/spectral_alpha_heatmap.png``: α per layer × module type;
``plots/esd_<name>.png``: the ESD on log-log axes with the fitted tail) to ``--out`` (default: the run
directory / model folder itself, or the directory holding the checkpoint file).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from layerwise.spectral import SpectralReport, analyze

__all__ = ["register", "run", "load_state_dict", "plot_alpha_heatmap", "plot_esd", "main"]

_TYPE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "ssm_in", "ssm_out", "embed", "head", "other")


class AnalyzeError(RuntimeError):
    """A PATH that cannot be read as weights."""


def _from_checkpoint_obj(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise AnalyzeError(f"{path}: no state dict found (expected a dict with a 'model' key or a dict of tensors, "
                       f"got {type(obj).__name__})")


def _load_pt(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise AnalyzeError(f"{path}: cannot read as a torch checkpoint (weights_only=True): {exc}") from exc
    return _from_checkpoint_obj(obj, path)


def _load_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise AnalyzeError(f"{path}: reading .safetensors needs the 'safetensors' package") from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise AnalyzeError(f"{path}: cannot read as safetensors: {exc}") from exc


def load_state_dict(path: str | os.PathLike) -> tuple[Mapping[str, torch.Tensor], Path]:
    """Load the weights at ``path`` (see the module docstring); returns ``(state_dict, default_out_dir)``."""
    p = Path(path)
    if not p.exists():
        raise AnalyzeError(f"{p}: no such file or directory")
    if p.is_dir():
        last = p / "checkpoints" / "last.pt"
        if last.is_file():
            return _load_pt(last), p
        from layerwise.lab.distributed import load_sharded_model_state, sharded_checkpoint

        dcp_dir = sharded_checkpoint(p / "checkpoints" / "last.dcp") or sharded_checkpoint(p)
        if dcp_dir is not None:  # a torch.distributed.checkpoint folder (FSDP run), read in this one process
            try:  # through layerwise.lab.safeload: a crafted .metadata pickle is refused, never run
                return load_sharded_model_state(dcp_dir), p if dcp_dir != p else p.parent
            except Exception as exc:  # noqa: BLE001 - re-raised with the path
                raise AnalyzeError(f"{dcp_dir}: cannot read as a DCP checkpoint: {exc}") from exc
        if (p / "model.safetensors").is_file():
            return _load_safetensors(p / "model.safetensors"), p
        shards = sorted(p.glob("model-*.safetensors"))
        if shards:
            sd: dict[str, torch.Tensor] = {}
            for s in shards:
                sd.update(_load_safetensors(s))
            return sd, p
        if (p / "pytorch_model.bin").is_file():
            return _load_pt(p / "pytorch_model.bin"), p
        bins = sorted(p.glob("pytorch_model-*.bin"))
        if bins:
            sd = {}
            for b in bins:
                sd.update(_load_pt(b))
            return sd, p
        raise AnalyzeError(f"{p}: directory holds none of checkpoints/last.pt, checkpoints/last.dcp/, model.safetensors, "
                           f"model-*.safetensors, pytorch_model.bin")
    if p.suffix == ".safetensors":
        return _load_safetensors(p), p.parent
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _load_pt(p), p.parent
    raise AnalyzeError(f"{p}: unknown file type {p.suffix!r} (expected .pt, .pth, .bin, .ckpt or .safetensors)")


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alpha_heatmap(report: SpectralReport, path: str | os.PathLike, *, key: str = "alpha") -> bool:
    """Heatmap of ``key`` (default α) per block layer (rows) × module type (columns); False if no block rows."""
    rows = [r for r in report.rows if r.get("layer") is not None]
    if not rows:
        return False
    plt = _plt()
    types = [t for t in _TYPE_ORDER if any(r["module_type"] == t for r in rows)]
    layers = sorted({r["layer"] for r in rows})
    grid = torch.full((len(layers), len(types)), float("nan"))
    for r in rows:
        v = r.get(key)
        grid[layers.index(r["layer"]), types.index(r["module_type"])] = v if v is not None else float("nan")
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(types), 1.0 + 0.35 * len(layers)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(types)), types)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(f"{key} ({report.estimator})")
    if len(layers) * len(types) <= 400:
        for i in range(len(layers)):
            for j in range(len(types)):
                v = float(grid[i, j])
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_esd(eigs: torch.Tensor, row: Mapping[str, Any], path: str | os.PathLike) -> None:
    """ESD of one matrix as a log-binned density on log-log axes, with xmin and the fitted power law."""
    plt = _plt()
    e = eigs.detach().double().cpu()
    e = e[torch.isfinite(e) & (e > 0)]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if e.numel() >= 2 and float(e.max()) > float(e.min()):
        edges = torch.logspace(math.log10(float(e.min())), math.log10(float(e.max())) * (1 + 1e-12) + 1e-12,
                               min(60, max(8, e.numel() // 8)) + 1, dtype=torch.float64)
        counts = torch.histogram(e, edges).hist
        dens = counts / (e.numel() * (edges[1:] - edges[:-1]))
        centers = (edges[1:] * edges[:-1]).sqrt()
        keep = dens > 0
        ax.loglog(centers[keep].numpy(), dens[keep].numpy(), "o", ms=3, label="ESD")
        a, xmin, n_tail = row.get("alpha"), row.get("xmin"), row.get("n_tail") or 0
        if a is not None and xmin is not None and math.isfinite(a) and math.isfinite(xmin) and xmin > 0:
            x = torch.logspace(math.log10(xmin), math.log10(float(e.max())), 50, dtype=torch.float64)
            y0 = esd_density_at(centers[keep], dens[keep], xmin)
            # the fitted slope -α, drawn through the histogram's density at xmin (the normalised power law
            # (n_tail/N)(α-1)/xmin · (x/xmin)^-α assumes the density is a pure power law from xmin on, which a
            # spectrum whose xmin sits on its bulk is not: it would float above the data)
            y = y0 * (x / xmin) ** (-a)
            ax.loglog(x.numpy(), y.numpy(), "r-", label=f"slope −α, α={a:.2f} (n_tail={n_tail})")
            ax.axvline(xmin, color="r", ls=":", lw=1, label=f"xmin={xmin:.3g}")
    else:
        ax.text(0.5, 0.5, "degenerate spectrum", transform=ax.transAxes, ha="center")
    ax.set_xlabel("eigenvalue λ of the Gram matrix")
    ax.set_ylabel("density")
    ax.set_title(str(row.get("name", "")), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def esd_density_at(centers: torch.Tensor, dens: torch.Tensor, x: float) -> float:
    """The log-log linear interpolation of a binned density at ``x`` (clamped to the outermost bins)."""
    lc, ld = centers.double().log(), dens.double().log()
    lx = math.log(x)
    if lx <= float(lc[0]):
        return float(dens[0])
    if lx >= float(lc[-1]):
        return float(dens[-1])
    i = int(torch.searchsorted(lc, torch.tensor([lx], dtype=torch.float64))[0])
    w = (lx - float(lc[i - 1])) / (float(lc[i]) - float(lc[i - 1]))
    return math.exp(float(ld[i - 1]) + w * (float(ld[i]) - float(ld[i - 1])))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _resolve_names(report: SpectralReport, wanted: list[str]) -> list[str]:
    names = [r["name"] for r in report.rows]
    out = []
    for w in wanted:
        if w in names:
            out.append(w)
            continue
        hits = [n for n in names if w in n]
        if not hits:
            raise AnalyzeError(f"--plot-esd {w!r}: no analysed matrix matches (e.g. {names[:3]})")
        out.extend(hits[:8])
    return out


# ------------------------------------------------------------------------------------------------ command
def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``analyze`` sub-command to a ``layerwise`` CLI parser; sets ``func=run``."""
    p = subparsers.add_parser("analyze", help="heavy-tail spectral analysis of a run / checkpoint / HF model",
                              description=__doc__.replace("``", ""),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory, .pt/.safetensors checkpoint, or Hugging Face model folder")
    p.add_argument("--out", default=None, help="output directory (default: next to the input)")
    p.add_argument("--select", default="blocks", choices=("blocks", "linear", "all"),
                   help="which matrices (default: the block matrices of layerwise.anatomy)")
    p.add_argument("--include-embeddings", action="store_true", help="also analyse the embedding")
    p.add_argument("--include-head", action="store_true", help="also analyse the LM head")
    p.add_argument("--estimator", default="hill", choices=("hill", "ks"),
                   help="hill: AlphaDecay's xmin = median eigenvalue (default); ks: Clauset's KS-fitted xmin")
    p.add_argument("--shape-correction", default=None, choices=("difference", "ratio"),
                   help="add alpha_corrected: alpha relative to Gaussian noise of the same shape")
    p.add_argument("--min-n", type=int, default=10, help="fewer eigenvalues than this give alpha = NaN")
    p.add_argument("--plot-esd", nargs="*", default=None, metavar="NAME",
                   help="matrices (names or substrings) whose ESD to plot (default: lowest- and highest-alpha)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``layerwise analyze``; returns the process exit code (0 ok, 2 unreadable input)."""
    try:
        sd, default_out = load_state_dict(args.path)
    except AnalyzeError as exc:
        print(f"layerwise analyze: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if getattr(args, "out", None) else default_out
    report = analyze(
        sd,
        getattr(args, "select", "blocks"),
        include_embeddings=getattr(args, "include_embeddings", False),
        include_head=getattr(args, "include_head", False),
        estimator=getattr(args, "estimator", "hill"),
        shape_correction=getattr(args, "shape_correction", None),
        min_n=getattr(args, "min_n", 10),
        keep_eigs=True,
    )
    if not report.rows:
        print(f"layerwise analyze: error: {args.path}: no weight matrices selected "
              f"({len(sd)} tensors; try --select all)", file=sys.stderr)
        return 2
    cols = ["name", "shape", "layer", "module_type", "alpha"]
    if report.settings.get("shape_correction"):
        cols.append("alpha_corrected")
    cols += ["xmin", "ks", "spectral_norm", "stable_rank", "reason"]
    print(report.to_markdown(cols))
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "spectral.json"
    report.to_json(str(json_path))
    written = [json_path]
    if not getattr(args, "no_plots", False):
        plots = out / "plots"
        plots.mkdir(exist_ok=True)
        if plot_alpha_heatmap(report, plots / "spectral_alpha_heatmap.png"):
            written.append(plots / "spectral_alpha_heatmap.png")
        wanted = getattr(args, "plot_esd", None)
        try:
            if wanted:
                chosen = _resolve_names(report, list(wanted))
            else:
                ok = [r for r in report.rows if math.isfinite(r["alpha"])]
                chosen = list(dict.fromkeys([min(ok, key=lambda r: r["alpha"])["name"],
                                             max(ok, key=lambda r: r["alpha"])["name"]])) if ok else []
        except AnalyzeError as exc:
            print(f"layerwise analyze: error: {exc}", file=sys.stderr)
            return 2
        for name in chosen:
            f = plots / f"esd_{_safe(name)}.png"
            plot_esd(report.eigs[name], report.by_name(name), f)
            written.append(f)
    n_nan = sum(1 for r in report.rows if not math.isfinite(r["alpha"]))
    print(f"\n{len(report.rows)} matrices in {report.elapsed_s:.2f} s ({n_nan} without alpha); wrote "
          + ", ".join(str(w) for w in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m layerwise.lab.analyze PATH ...``."""
    parser = argparse.ArgumentParser(prog="layerwise")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["analyze", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
