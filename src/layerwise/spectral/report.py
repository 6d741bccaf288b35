"""``analyze(model_or_state_dict)``: one row of HT-SR statistics per weight matrix, as a :class:`SpectralReport`.

Selection (``select=``):

* ``"blocks"`` (default) - the Linear weights inside transformer blocks (q/k/v/o, gate/up/down, ...); on a
  model without recognisable blocks, every Linear weight (:func:`layerwise.names.block_linear_weights`).  On a
  state dict: the 2-D ``*.weight`` tensors whose name has a block index (``layers.N.``, ``h.N.``, ...) and
  is not an embedding, head or norm; without block names, every such 2-D weight.
* ``"linear"`` - every Linear weight (modules) / every 2-D ``*.weight`` tensor (state dicts);
* ``"all"`` - every parameter / tensor with two or more dimensions (multipliers excluded);
* a callable ``select(name, tensor) -> bool`` over every (canonical name, tensor) pair.

``include_embeddings`` / ``include_head`` add the embedding and LM-head matrices (a tied head is reported
under its own name).  Tensors that are selected but not 2-D are listed in ``report.skipped`` with a reason.
Names are canonical (:func:`layerwise.names.canonical_name`); Hugging Face names such as
``model.layers.0.self_attn.q_proj.weight`` are recognised as-is.

Robustness: a zero, rank-deficient, non-finite, tiny (``N < min_n``) or degenerate matrix gives a row with
``alpha = NaN`` and a ``reason``; one bad matrix never breaks a report.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .. import names as _names
from .eig import gram_eigvals
from .estimators import TailFit, hill_fit, ks_alpha, shape_corrected_alpha
from .metrics import spectral_metrics

__all__ = ["analyze", "SpectralReport", "select_matrices"]

_NON_MATRIX_TYPES = ("embed", "head", "norm", "multiplier")
#: elements (sum over a chunk of matrices) whose Gram matrices are built at once; bounds peak memory
_CHUNK_ELEMS = 1 << 27

_COLUMNS = ("name", "shape", "module_type", "layer", "alpha", "xmin", "ks", "n_tail", "spectral_norm",
            "stable_rank", "matrix_entropy", "alpha_weighted", "reason")


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.{digits}e}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else \
            "[" + ", ".join(_fmt(x, digits) for x in v) + "]"
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


@dataclass
class SpectralReport:
    """Rows of HT-SR statistics, one per analysed matrix.

    Each row is a dict with ``name`` (canonical), ``shape`` ([out, in]), ``module_type``
    (q/k/v/o/gate/up/down/embed/head/other), ``layer`` (block index or ``None``), ``n_eigs`` (N = min(out, in)),
    ``estimator``, ``alpha``, ``xmin``, ``ks`` (KS distance of the fit), ``n_tail``, ``alpha_corrected``
    (when a shape correction was asked for, else absent), ``spectral_norm``, ``frobenius_norm``,
    ``stable_rank``, ``matrix_entropy``, ``alpha_weighted``, ``lambda_max``, ``top_sv`` and ``reason``
    (``None``, or why ``alpha`` is NaN).  ``skipped`` lists selected tensors that are not matrices.
    ``eigs`` maps names to eigenvalue tensors when ``analyze(..., keep_eigs=True)``.
    """

    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    estimator: str = "hill"
    settings: dict[str, Any] = field(default_factory=dict)
    eigs: dict[str, torch.Tensor] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def by_name(self, name: str) -> dict[str, Any]:
        """The row of ``name`` (canonical); ``KeyError`` if it was not analysed."""
        cname = _names.canonical_name(name)
        for r in self.rows:
            if r["name"] == cname:
                return r
        raise KeyError(f"no row named {name!r} in this SpectralReport ({len(self.rows)} rows)")

    def alphas(self) -> dict[str, float]:
        """``{name: alpha}`` over all rows (NaN where undefined)."""
        return {r["name"]: r["alpha"] for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"estimator": self.estimator, "settings": self.settings, "rows": self.rows,
                          "skipped": self.skipped, "elapsed_s": self.elapsed_s})

    def to_json(self, path: str | None = None, *, indent: int | None = 2) -> str:
        """JSON text of the report (NaN/Inf written as ``null``); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text: str) -> "SpectralReport":
        """Inverse of :meth:`to_json` (``null`` numbers come back as NaN)."""
        d = json.loads(text)
        num = ("alpha", "xmin", "ks", "alpha_corrected", "spectral_norm", "frobenius_norm", "stable_rank",
               "matrix_entropy", "alpha_weighted", "lambda_max")
        rows = [{k: (math.nan if (k in num and v is None) else v) for k, v in r.items()} for r in d["rows"]]
        return cls(rows=rows, skipped=d.get("skipped", []), estimator=d.get("estimator", "hill"),
                   settings=d.get("settings", {}), elapsed_s=d.get("elapsed_s", 0.0))

    def to_markdown(self, columns: Sequence[str] | None = None, *, digits: int = 4) -> str:
        """A Markdown table of the rows (``columns`` default: name, shape, type, layer, α, xmin, KS, ...)."""
        cols = list(columns) if columns is not None else [c for c in _COLUMNS]
        if columns is None and any("alpha_corrected" in r for r in self.rows):
            cols.insert(cols.index("alpha") + 1, "alpha_corrected")
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c), digits) for c in cols) + " |")
        for s in self.skipped:
            lines.append(f"\nskipped: `{s['name']}` {_fmt(s['shape'], digits)}: {s['reason']}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ selection
def _module_entries(model: nn.Module, select, include_embeddings: bool, include_head: bool):
    params = [(_names.canonical_name(n), p) for n, p in model.named_parameters(remove_duplicate=False)]
    chosen: list[tuple[str, torch.Tensor]] = []
    if select == "blocks":
        chosen = list(_names.block_linear_weights(model))
    elif select == "linear":
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.Linear) or getattr(mod, "_layerwise_linear", False):
                chosen.append((_names.canonical_name(f"{mname}.weight" if mname else "weight"), mod.weight))
    elif select == "all":
        chosen = [(n, p) for n, p in params if p.ndim >= 2 and not _names.is_multiplier(n)]
    elif callable(select):
        chosen = [(n, p) for n, p in params if select(n, p)]
    else:
        raise ValueError(f"analyze: select must be 'blocks', 'linear', 'all' or a callable, got {select!r}")
    if include_embeddings:
        chosen += [(n, p) for n, p in params if _names.module_type(n) == "embed" and p.ndim == 2]
    if include_head:
        chosen += [(n, p) for n, p in params if _names.module_type(n) == "head" and n.endswith("weight")]
    return chosen


def _state_dict_entries(sd: Mapping[str, Any], select, include_embeddings: bool, include_head: bool):
    items = [(_names.canonical_name(str(k)), v) for k, v in sd.items() if isinstance(v, torch.Tensor)]

    def matrix_weight(n: str, t: torch.Tensor) -> bool:
        return n.endswith("weight") and t.ndim >= 2 and _names.module_type(n) not in _NON_MATRIX_TYPES

    if select == "blocks":
        chosen = [(n, t) for n, t in items if matrix_weight(n, t) and _names.layer_index(n) is not None]
        if not chosen:
            chosen = [(n, t) for n, t in items if matrix_weight(n, t)]
    elif select == "linear":
        chosen = [(n, t) for n, t in items if matrix_weight(n, t)]
    elif select == "all":
        chosen = [(n, t) for n, t in items if t.ndim >= 2 and not _names.is_multiplier(n)]
    elif callable(select):
        chosen = [(n, t) for n, t in items if select(n, t)]
    else:
        raise ValueError(f"analyze: select must be 'blocks', 'linear', 'all' or a callable, got {select!r}")
    if include_embeddings:
        chosen += [(n, t) for n, t in items if _names.module_type(n) == "embed" and t.ndim == 2]
    if include_head:
        chosen += [(n, t) for n, t in items if _names.module_type(n) == "head" and n.endswith("weight")
                   and t.ndim == 2]
    return chosen


_TYPE_RANK = {t: i for i, t in enumerate(("q", "k", "v", "o", "gate", "up", "down", "other", "embed", "head"))}


def _sort_key(item: tuple[str, torch.Tensor]) -> tuple:
    name = item[0]
    layer = _names.layer_index(name)
    return (layer is None, layer if layer is not None else 0, _TYPE_RANK.get(_names.module_type(name), 7), name)


def select_matrices(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    select: str | Callable[[str, torch.Tensor], bool] = "blocks",
    *,
    include_embeddings: bool = False,
    include_head: bool = False,
) -> list[tuple[str, torch.Tensor]]:
    """The (canonical name, tensor) pairs :func:`analyze` would look at, without duplicates.

    Modules: in model order.  State dicts: by block index, then module type (q, k, v, o, gate, up, down,
    other, embed, head), then name - the order of keys in a file does not matter.
    """
    if isinstance(model_or_state_dict, nn.Module):
        chosen = _module_entries(model_or_state_dict, select, include_embeddings, include_head)
    elif isinstance(model_or_state_dict, Mapping):
        chosen = _state_dict_entries(model_or_state_dict, select, include_embeddings, include_head)
        # files (safetensors) store keys alphabetically: order by block, then module type, then name
        chosen.sort(key=_sort_key)
    else:
        raise TypeError(f"analyze: expected an nn.Module or a state dict (Mapping[str, Tensor]), got "
                        f"{type(model_or_state_dict).__name__}")
    seen: set[str] = set()
    out = []
    for n, t in chosen:
        if n not in seen:
            seen.add(n)
            out.append((n, t))
    return out


# ------------------------------------------------------------------------------------------------ analyze
def _chunks(mats: list[tuple[int, torch.Tensor]]) -> Iterable[list[tuple[int, torch.Tensor]]]:
    cur, size = [], 0
    for item in mats:
        if cur and size + item[1].numel() > _CHUNK_ELEMS:
            yield cur
            cur, size = [], 0
        cur.append(item)
        size += item[1].numel()
    if cur:
        yield cur


@torch.no_grad()
def analyze(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    select: str | Callable[[str, torch.Tensor], bool] = "blocks",
    *,
    include_embeddings: bool = False,
    include_head: bool = False,
    estimator: str | Callable[[list[torch.Tensor]], TailFit] = "hill",
    xmin_range: tuple[float | None, float | None] | None = None,
    min_n: int = 10,
    shape_correction: str | None = None,
    top_k: int = 5,
    dtype: torch.dtype = torch.float32,
    workers: int | None = None,
    solver: str = "auto",
    keep_eigs: bool = False,
) -> SpectralReport:
    """HT-SR analysis of the selected weight matrices of a model or a state dict.

    Args:
        model_or_state_dict: any ``nn.Module`` (ours, Hugging Face, multiplier-wrapped) or a state dict.
        select: ``"blocks"`` (default), ``"linear"``, ``"all"`` or a callable (see the module docstring).
        include_embeddings, include_head: also analyse the embedding / LM-head matrices.
        estimator: ``"hill"`` (AlphaDecay's fixed-threshold estimator, default), ``"ks"`` (Clauset's KS-fitted
            xmin; ``xmin_range`` restricts its candidates) or a callable ``eigs_list -> TailFit``.
        min_n: matrices with fewer than ``min_n`` eigenvalues (N = min(out, in)) get ``alpha = NaN``.
        shape_correction: ``None`` (default), ``"difference"`` or ``"ratio"``: adds ``alpha_corrected``
            (see :func:`layerwise.spectral.shape_corrected_alpha`).
        top_k: how many top singular values each row lists.
        dtype: eigenvalue compute dtype (float32 default, float64 option).
        workers: CPU threads for the eigensolver (see :func:`gram_eigvals`).
        solver: the eigensolver, ``"auto"`` | ``"lapack"`` | ``"torch"`` (see :func:`gram_eigvals`).
        keep_eigs: keep each matrix's eigenvalues in ``report.eigs`` (for ESD plots).
    """
    t0 = time.perf_counter()
    if isinstance(estimator, str) and estimator not in ("hill", "ks"):
        raise ValueError(f"analyze: estimator must be 'hill', 'ks' or a callable, got {estimator!r}")
    if shape_correction not in (None, "difference", "ratio"):
        raise ValueError(f"analyze: shape_correction must be None, 'difference' or 'ratio', got {shape_correction!r}")
    entries = select_matrices(model_or_state_dict, select, include_embeddings=include_embeddings,
                              include_head=include_head)
    est_name = estimator if isinstance(estimator, str) else getattr(estimator, "__name__", "custom")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    mats: list[tuple[int, torch.Tensor]] = []
    for name, t in entries:
        shape = list(t.shape)
        if t.ndim != 2:
            skipped.append({"name": name, "shape": shape, "reason": f"not a matrix ({t.ndim}-D tensor)"})
            continue
        if t.numel() == 0:
            skipped.append({"name": name, "shape": shape, "reason": "empty matrix"})
            continue
        if t.is_complex() or not (t.is_floating_point()):
            skipped.append({"name": name, "shape": shape, "reason": f"unsupported dtype {t.dtype}"})
            continue
        if t.device.type == "meta":
            skipped.append({"name": name, "shape": shape, "reason": "meta tensor (no data)"})
            continue
        rows.append({"name": name, "shape": shape, "module_type": _names.module_type(name),
                     "layer": _names.layer_index(name), "n_eigs": min(shape), "estimator": est_name})
        mats.append((len(rows) - 1, t.detach()))

    eig_list: list[torch.Tensor | None] = [None] * len(rows)
    for chunk in _chunks(mats):
        evs = gram_eigvals([t for _, t in chunk], dtype, workers=workers, solver=solver)
        for (r, _), ev in zip(chunk, evs):
            eig_list[r] = ev
    eigs = [e for e in eig_list]  # all filled

    if not eigs:
        fit = TailFit(torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int64), [])
    elif estimator == "hill":
        fit = hill_fit(eigs, min_n=min_n)
    elif estimator == "ks":
        fit = ks_alpha(eigs, xmin_range, min_n=min_n)
    else:
        fit = estimator(eigs)  # type: ignore[operator]
        if not isinstance(fit, TailFit):
            raise TypeError(f"analyze: a custom estimator must return a TailFit, got {type(fit).__name__}")
    for k, (row, e) in enumerate(zip(rows, eigs)):
        a = float(fit.alpha[k])
        row["alpha"] = a
        row["xmin"] = float(fit.xmin[k])
        row["ks"] = float(fit.ks[k])
        row["n_tail"] = int(fit.n_tail[k])
        reason = fit.reasons[k] if k < len(fit.reasons) else None
        if shape_correction is not None:
            row["alpha_corrected"] = (float(shape_corrected_alpha(a, row["shape"], est_name if est_name in
                                      ("hill", "ks") else "hill", mode=shape_correction))
                                      if math.isfinite(a) else math.nan)
        row.update(spectral_metrics(e, a, top_k=top_k))
        if reason is not None and reason.startswith("non-finite"):
            reason = "non-finite entries (NaN/Inf) in the matrix or its Gram matrix"
        row["reason"] = reason
    report = SpectralReport(
        rows=rows, skipped=skipped, estimator=est_name,
        settings={"select": select if isinstance(select, str) else getattr(select, "__name__", "callable"),
                  "include_embeddings": include_embeddings, "include_head": include_head, "min_n": min_n,
                  "xmin_range": list(xmin_range) if xmin_range is not None else None,
                  "shape_correction": shape_correction, "dtype": str(dtype).replace("torch.", "")},
        eigs={r["name"]: e.cpu() for r, e in zip(rows, eigs)} if keep_eigs else {},
    )
    report.elapsed_s = time.perf_counter() - t0
    return report
