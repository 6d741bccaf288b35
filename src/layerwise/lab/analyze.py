"""``layerwise analyze PATH``: HT-SR spectral analysis of a run, a checkpoint or a Hugging Face model folder.

PATH may be

* a run directory (reads ``RUN/checkpoints/last.pt``: a ``torch.save``'d dict whose ``"model"`` key is the
  state dict);
* a ``.pt`` / ``.pth`` / ``.bin`` file: such a dict (``"model"`` or ``"state_dict"`` key) or a raw state dict;
* a ``.safetensors`` file;
* a local Hugging Face model folder (``model.safetensors``, sharded ``model-*.safetensors`` with or without
  ``model.safetensors.index.json``, or ``pytorch_model.bin`` / ``pytorch_model-*.bin`` /
  ``pytorch_model.bin.index.json``).

Tensors are read lazily (:mod:`layerwise.lab.weight_source`): the matrices are selected from names and
shapes alone, then read straight into one reused float32 buffer (no full-size copy in the stored dtype),
analysed and released a bounded batch at a time, grouped by shape, so a checkpoint larger than memory can be
analysed: peak memory follows the largest matrix, not the model (by default a batch's float32 matrices and
Gram matrices take at most half of twice the largest matrix's float32 size plus its Gram matrix, or that
largest matrix alone; ``--batch-mb``).  Torch files are opened with ``torch.load(..., mmap=True, weights_only=True,
map_location="cpu")``.
``--device cuda`` computes the Gram matrices and eigenvalues on a GPU.  The command prints a
table, writes ``spectral.json`` and plots (``plots/spectral_alpha_heatmap.png``: α per layer × module type;
``plots/esd_<name>.png``: the ESD on log-log axes with the fitted tail) to ``--out`` (default: the run
directory / model folder itself, or the directory holding the checkpoint file).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from layerwise import names as _names
from layerwise.lab.weight_source import (
    InMemorySource,
    SafetensorsSource,
    SourceError,
    TorchFileSource,
    WeightSource,
    from_checkpoint_obj,
    index_files,
)
from layerwise.spectral import SpectralReport, analyze, select_matrices

__all__ = [
    "register",
    "run",
    "load_state_dict",
    "open_weights",
    "analyze_source",
    "memory_bound",
    "plot_alpha_heatmap",
    "plot_esd",
    "main",
]

_TYPE_ORDER = (
    "q",
    "k",
    "v",
    "qkv",
    "o",
    "gate",
    "up",
    "gate_up",
    "down",
    "ssm_in",
    "ssm_out",
    "embed",
    "head",
    "other",
)


class AnalyzeError(RuntimeError):
    """A PATH that cannot be read as weights."""


def _from_checkpoint_obj(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    try:
        return from_checkpoint_obj(obj, path)
    except SourceError as exc:
        raise AnalyzeError(str(exc)) from exc


def _open_dcp(p: Path) -> tuple[WeightSource, Path] | None:
    from layerwise.lab.distributed import load_sharded_model_state, sharded_checkpoint

    dcp_dir = sharded_checkpoint(p / "checkpoints" / "last.dcp") or sharded_checkpoint(p)
    if dcp_dir is None:
        return None
    # a torch.distributed.checkpoint folder (FSDP run), read in this one process (in memory)
    try:  # through layerwise.lab.safeload: a crafted .metadata pickle is refused, never run
        sd = load_sharded_model_state(dcp_dir)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise AnalyzeError(f"{dcp_dir}: cannot read as a DCP checkpoint: {exc}") from exc
    return InMemorySource(dcp_dir, sd), p if dcp_dir != p else p.parent


def _open(p: Path) -> tuple[WeightSource, Path]:
    if not p.exists():
        raise AnalyzeError(f"{p}: no such file or directory")
    if p.is_dir():
        last = p / "checkpoints" / "last.pt"
        if last.is_file():
            return TorchFileSource.open(last, [last]), p
        dcp = _open_dcp(p)
        if dcp is not None:
            return dcp
        # a Hugging Face folder: one file, an index of shards, or shards without an index; safetensors first
        for cls, stem, ext in ((SafetensorsSource, "model", "safetensors"), (TorchFileSource, "pytorch_model", "bin")):
            if (p / f"{stem}.{ext}").is_file():
                return cls.open(p, [p / f"{stem}.{ext}"]), p
            if (p / f"{stem}.{ext}.index.json").is_file():
                return cls.open(p, index_files(p / f"{stem}.{ext}.index.json")), p
            shards = sorted(p.glob(f"{stem}-*.{ext}"))
            if shards:
                return cls.open(p, shards), p
        raise AnalyzeError(
            f"{p}: directory holds none of checkpoints/last.pt, checkpoints/last.dcp/, model.safetensors, "
            f"model.safetensors.index.json, model-*.safetensors, pytorch_model.bin"
        )
    if p.suffix == ".safetensors":
        return SafetensorsSource.open(p, [p]), p.parent
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return TorchFileSource.open(p, [p]), p.parent
    raise AnalyzeError(f"{p}: unknown file type {p.suffix!r} (expected .pt, .pth, .bin, .ckpt or .safetensors)")


def open_weights(path: str | os.PathLike) -> tuple[WeightSource, Path]:
    """A lazy :class:`~layerwise.lab.weight_source.WeightSource` for ``path`` (see the module docstring)
    and the default output directory.  Reads only headers / pickles, no tensor data."""
    try:
        return _open(Path(path))
    except SourceError as exc:
        raise AnalyzeError(str(exc)) from exc


def load_state_dict(path: str | os.PathLike) -> tuple[Mapping[str, torch.Tensor], Path]:
    """Load all the weights at ``path`` into memory (small checkpoints); returns ``(state_dict, out_dir)``.
    ``layerwise analyze`` itself reads lazily (:func:`open_weights`, :func:`analyze_source`)."""
    src, out = open_weights(path)
    try:
        return src.load_all(), out
    except SourceError as exc:
        raise AnalyzeError(str(exc)) from exc


# ------------------------------------------------------------------------------------------- lazy analysis
def _select(meta: Mapping[str, torch.Tensor], select, include_embeddings: bool, include_head: bool):
    """Which matrices to analyse, decided on meta tensors (names, shapes, dtypes; no data).  The one call
    of the library's selection: replace it here when the selection rules change."""
    chosen = select_matrices(meta, select, include_embeddings=include_embeddings, include_head=include_head)
    # (name, tensor) pairs; the library may describe each matrix by a richer row (an anatomy ParamInfo)
    return [(k if isinstance(k, str) else k.name, t) for k, t in chosen]


def _is_real_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not t.is_complex()


def _cost(t: torch.Tensor) -> int:
    """Bytes one tensor takes in a batch: a real floating matrix its float32 copy (what is read) and its
    Gram matrix; anything else (analysed only to be reported as skipped) its stored size."""
    if not _is_real_float(t):
        return t.numel() * t.element_size()
    n = min(t.shape) if t.ndim == 2 else 0
    return 4 * t.numel() + 4 * n * n


def memory_bound(chosen: list[tuple[str, torch.Tensor]]) -> int:
    """The issue-20 bound on the working set: twice the largest chosen tensor's float32 size plus its Gram
    matrix (bytes; 0 for no tensors)."""
    if not chosen:
        return 0
    t = max((t for _, t in chosen), key=lambda t: t.numel())
    n = min(t.shape) if t.ndim == 2 else 0
    return 2 * 4 * t.numel() + 4 * n * n


def _plan(chosen: list[tuple[str, torch.Tensor]], budget: int | None) -> list[list[str]]:
    """Batches of names: same shape and dtype within a batch (they share one Gram batch), each batch's
    :func:`_cost` at most ``budget`` bytes (at least one tensor).  ``budget=None``: half of
    :func:`memory_bound`, leaving the rest for the read buffer, BLAS/LAPACK workspaces and the allocator
    (measured at llama-60m, where those are a large part of the bound: 3/4 went over it by 5 %)."""
    if not chosen:
        return []
    cap = budget if budget is not None else memory_bound(chosen) // 2
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for n, t in chosen:
        groups.setdefault((tuple(t.shape), t.dtype), []).append((n, t))
    batches: list[list[str]] = []
    for items in groups.values():
        cur: list[str] = []
        size = 0
        for n, t in items:
            c = _cost(t)
            if cur and size + c > cap:
                batches.append(cur)
                cur, size = [], 0
            cur.append(n)
            size += c
        batches.append(cur)
    return batches


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks below its mmap threshold, 32 MiB at
    most, which would let the resident set creep up over the batches); a no-op elsewhere."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _in(names: frozenset[str]) -> Callable[[str, torch.Tensor], bool]:
    """A ``select`` callable for :func:`layerwise.spectral.analyze`: exactly the tensors named."""
    return lambda name, _t: name in names


def analyze_source(
    source: WeightSource,
    select: Any = "blocks",
    *,
    include_embeddings: bool = False,
    include_head: bool = False,
    device: str | torch.device = "cpu",
    batch_bytes: int | None = None,
    keep_eigs: bool = False,
    **analyze_kwargs: Any,
) -> SpectralReport:
    """:func:`layerwise.spectral.analyze` over a lazy source: select on metadata, then read, move to
    ``device``, analyse and release one batch (:func:`_plan`) at a time.  Rows come out in the order the
    selection gives; every row is the one ``analyze`` gives on the whole state dict (rows are independent)."""
    t0 = time.perf_counter()
    device = torch.device(device)
    meta = source.meta()
    raw_of: dict[str, str] = {}
    for k in meta:
        raw_of.setdefault(_names.canonical_name(str(k)), k)
    chosen = _select(meta, select, include_embeddings, include_head)
    order = {n: i for i, (n, _) in enumerate(chosen)}
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    eigs: dict[str, torch.Tensor] = {}
    rep = None
    plan = _plan(chosen, batch_bytes)
    shape_of = dict(chosen)
    # one float32 buffer for the largest batch of real floating matrices, reused by every batch: the weights
    # are read straight into it (converted), so neither a stored-dtype copy nor a float32 copy per batch exists
    floats = [b for b in plan if _is_real_float(shape_of[b[0]])]
    arena = torch.empty(max((len(b) * shape_of[b[0]].numel() for b in floats), default=0), dtype=torch.float32)
    for batch in plan:
        first = shape_of[batch[0]]
        try:
            if _is_real_float(first):
                buf = arena[: len(batch) * first.numel()].view(len(batch), *first.shape)
                source.read_into([(raw_of[n], buf[i]) for i, n in enumerate(batch)])
                sd = {n: buf[i].to(device) for i, n in enumerate(batch)}
            else:  # reported as skipped by analyze: read as stored
                loaded = dict(source.read([raw_of[n] for n in batch]))
                sd = {n: loaded.pop(raw_of[n]).to(device) for n in batch}
        except SourceError as exc:
            raise AnalyzeError(str(exc)) from exc
        rep = analyze(sd, _in(frozenset(sd)), keep_eigs=keep_eigs, **analyze_kwargs)
        rows += rep.rows
        skipped += rep.skipped
        eigs.update(rep.eigs)
        del sd
        _trim_heap()
    del arena
    rows.sort(key=lambda r: order[r["name"]])
    skipped.sort(key=lambda r: order.get(r["name"], len(order)))
    settings = dict(rep.settings) if rep is not None else {}
    settings.update(
        select=select if isinstance(select, str) else getattr(select, "__name__", "callable"),
        include_embeddings=include_embeddings,
        include_head=include_head,
        device=str(device),
    )
    out = SpectralReport(
        rows=rows,
        skipped=skipped,
        estimator=rep.estimator if rep is not None else str(analyze_kwargs.get("estimator", "hill")),
        settings=settings,
        eigs=eigs,
    )
    out.elapsed_s = time.perf_counter() - t0
    return out


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
        edges = torch.logspace(
            math.log10(float(e.min())),
            math.log10(float(e.max())) * (1 + 1e-12) + 1e-12,
            min(60, max(8, e.numel() // 8)) + 1,
            dtype=torch.float64,
        )
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
    p = subparsers.add_parser(
        "analyze",
        help="heavy-tail spectral analysis of a run / checkpoint / HF model",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="run directory, .pt/.safetensors checkpoint, or Hugging Face model folder")
    p.add_argument("--out", default=None, help="output directory (default: next to the input)")
    p.add_argument(
        "--select",
        default="blocks",
        choices=("blocks", "linear", "all"),
        help="which matrices (default: the block matrices of layerwise.anatomy)",
    )
    p.add_argument("--include-embeddings", action="store_true", help="also analyse the embedding")
    p.add_argument("--include-head", action="store_true", help="also analyse the LM head")
    p.add_argument(
        "--estimator",
        default="hill",
        choices=("hill", "ks"),
        help="hill: AlphaDecay's xmin = median eigenvalue (default); ks: Clauset's KS-fitted xmin",
    )
    p.add_argument(
        "--shape-correction",
        default=None,
        choices=("difference", "ratio"),
        help="add alpha_corrected: alpha relative to Gaussian noise of the same shape",
    )
    p.add_argument("--min-n", type=int, default=10, help="fewer eigenvalues than this give alpha = NaN")
    p.add_argument(
        "--plot-esd",
        nargs="*",
        default=None,
        metavar="NAME",
        help="matrices (names or substrings) whose ESD to plot (default: lowest- and highest-alpha)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the Gram matrices and eigenvalues are computed: cpu (default), cuda, cuda:N",
    )
    p.add_argument(
        "--batch-mb",
        type=float,
        default=None,
        metavar="MB",
        help="memory for one batch of matrices read at once: their float32 copies and Gram matrices "
        "(default: half of twice the largest matrix's float32 size plus its Gram matrix)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``layerwise analyze``; returns the process exit code (0 ok, 2 unreadable input)."""
    device = str(getattr(args, "device", "cpu") or "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        print(f"layerwise analyze: error: --device {device!r} is not a device (cpu, cuda, cuda:N)", file=sys.stderr)
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(
            f"layerwise analyze: error: --device {device}: CUDA is not available in this torch build/machine",
            file=sys.stderr,
        )
        return 2
    if dev.type not in ("cpu", "cuda"):
        print(f"layerwise analyze: error: --device {device!r}: only cpu and cuda are supported", file=sys.stderr)
        return 2
    batch_mb = getattr(args, "batch_mb", None)
    if batch_mb is not None and not (batch_mb > 0):
        print(f"layerwise analyze: error: --batch-mb must be > 0, got {batch_mb}", file=sys.stderr)
        return 2
    try:
        src, default_out = open_weights(args.path)
        out = Path(args.out) if getattr(args, "out", None) else default_out
        report = analyze_source(
            src,
            getattr(args, "select", "blocks"),
            include_embeddings=getattr(args, "include_embeddings", False),
            include_head=getattr(args, "include_head", False),
            device=dev,
            batch_bytes=None if batch_mb is None else int(batch_mb * 2**20),
            estimator=getattr(args, "estimator", "hill"),
            shape_correction=getattr(args, "shape_correction", None),
            min_n=getattr(args, "min_n", 10),
            keep_eigs=True,
        )
    except AnalyzeError as exc:
        print(f"layerwise analyze: error: {exc}", file=sys.stderr)
        return 2
    if not report.rows:
        print(
            f"layerwise analyze: error: {args.path}: no weight matrices selected "
            f"({len(src)} tensors; try --select all)",
            file=sys.stderr,
        )
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
                chosen = (
                    list(
                        dict.fromkeys(
                            [min(ok, key=lambda r: r["alpha"])["name"], max(ok, key=lambda r: r["alpha"])["name"]]
                        )
                    )
                    if ok
                    else []
                )
        except AnalyzeError as exc:
            print(f"layerwise analyze: error: {exc}", file=sys.stderr)
            return 2
        for name in chosen:
            f = plots / f"esd_{_safe(name)}.png"
            plot_esd(report.eigs[name], report.by_name(name), f)
            written.append(f)
    n_nan = sum(1 for r in report.rows if not math.isfinite(r["alpha"]))
    print(
        f"\n{len(report.rows)} matrices in {report.elapsed_s:.2f} s ({n_nan} without alpha); wrote "
        + ", ".join(str(w) for w in written)
    )
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
