"""``analyze(model_or_state_dict)``: one row of HT-SR statistics per weight matrix, as a :class:`SpectralReport`.

Selection (``select=``), from :func:`layerwise.anatomy` (the one place that knows model structure):

* ``"blocks"`` (default) - the block matrices: every 2-D weight inside a repeated block (q/k/v/o or fused
  qkv, gate/up/down, SSM in/out projections; ``nn.Linear`` and Hugging Face ``Conv1D`` alike); on a model
  without blocks, every 2-D layer that is neither an embedding nor a readout.  A module and its state dict
  give the same matrices.
* ``"linear"`` - every 2-D layer weight: block matrices, other matrices, input layers and readouts;
* ``"all"`` - every tensor with two or more dimensions (multipliers excluded);
* a callable ``select(name, tensor) -> bool`` over every (canonical name, tensor) pair.

``include_embeddings`` / ``include_head`` add the token-embedding and readout matrices (a tied pair is one
tensor and one row, under its first name).  Tensors that are selected but not 2-D are listed in
``report.skipped`` with a reason; unclassified >= 2-D tensors that a named selection leaves out are listed in
one warning.  Names are canonical (:func:`layerwise.names.canonical_name`).

Robustness: a zero, rank-deficient, non-finite, tiny (``N < min_n``) or degenerate matrix gives a row with
``alpha = NaN`` and a ``reason``; one bad matrix never breaks a report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import anatomy as _anatomy
from .._json import json_safe
from ..anatomy import ParamInfo
from ..names import canonical_name
from .eig import gram_eigvals
from .estimators import TailFit, hill_fit, ks_alpha, shape_corrected_alpha
from .metrics import spectral_metrics

__all__ = ["analyze", "SpectralReport", "select_matrices", "module_label"]

#: elements (sum over a chunk of matrices) whose Gram matrices are built at once; bounds peak memory
_CHUNK_ELEMS = 1 << 27

_COLUMNS = (
    "name",
    "shape",
    "module_type",
    "layer",
    "alpha",
    "xmin",
    "ks",
    "n_tail",
    "spectral_norm",
    "stable_rank",
    "matrix_entropy",
    "alpha_weighted",
    "reason",
)


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.{digits}e}"
    if isinstance(v, (list, tuple)):
        return (
            "x".join(str(x) for x in v)
            if all(isinstance(x, int) for x in v)
            else "[" + ", ".join(_fmt(x, digits) for x in v) + "]"
        )
    return str(v)


@dataclass
class SpectralReport:
    """Rows of HT-SR statistics, one per analysed matrix.

    Each row is a dict with ``name`` (canonical), ``shape`` (as stored: ``[out, in]`` for ``nn.Linear``,
    ``[in, out]`` for HF ``Conv1D``), ``module_type`` (the operator q/k/v/o/qkv/gate/up/down/ssm_in/ssm_out,
    else embed/head/other; :func:`module_label`), ``role`` (the anatomy role), ``layer`` (block index or
    ``None``), ``fan_in`` / ``fan_out``, ``n_eigs`` (N = min(out, in)),
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
        cname = canonical_name(name)
        for r in self.rows:
            if r["name"] == cname:
                return r
        raise KeyError(f"no row named {name!r} in this SpectralReport ({len(self.rows)} rows)")

    def alphas(self) -> dict[str, float]:
        """``{name: alpha}`` over all rows (NaN where undefined)."""
        return {r["name"]: r["alpha"] for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "estimator": self.estimator,
                "settings": self.settings,
                "rows": self.rows,
                "skipped": self.skipped,
                "elapsed_s": self.elapsed_s,
            }
        )

    def to_json(self, path: str | None = None, *, indent: int | None = 2) -> str:
        """JSON text of the report (NaN/Inf written as ``null``); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text: str) -> SpectralReport:
        """Inverse of :meth:`to_json` (``null`` numbers come back as NaN)."""
        d = json.loads(text)
        num = (
            "alpha",
            "xmin",
            "ks",
            "alpha_corrected",
            "spectral_norm",
            "frobenius_norm",
            "stable_rank",
            "matrix_entropy",
            "alpha_weighted",
            "lambda_max",
        )
        rows = [{k: (math.nan if (k in num and v is None) else v) for k, v in r.items()} for r in d["rows"]]
        return cls(
            rows=rows,
            skipped=d.get("skipped", []),
            estimator=d.get("estimator", "hill"),
            settings=d.get("settings", {}),
            elapsed_s=d.get("elapsed_s", 0.0),
        )

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
_OP_RANK = {
    t: i for i, t in enumerate(("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "ssm_in", "ssm_out"))
}
_ROLE_RANK = {"block_matrix": 0, "input": 1, "matrix": 2, "embedding": 3, "position_embedding": 4, "readout": 5}
#: roles each named selection takes (``"blocks"`` is :meth:`Anatomy.block_matrices`)
_LINEAR_ROLES = ("block_matrix", "matrix", "input", "readout")


def module_label(info: ParamInfo) -> str:
    """The ``module_type`` column of a report row: the operator (q/k/v/o/qkv/gate/up/down/ssm_in/...) when
    known, else ``embed`` / ``head`` for embeddings / readouts, else ``other``."""
    if info.operator is not None and info.operator not in ("token", "token_type", "position"):
        return info.operator
    return {"embedding": "embed", "position_embedding": "embed", "readout": "head"}.get(info.role, "other")


def _sort_key(info: ParamInfo) -> tuple:
    return (
        info.block is None,
        info.stack or "",
        info.block if info.block is not None else 0,
        _ROLE_RANK.get(info.role, 9),
        _OP_RANK.get(info.operator or "", len(_OP_RANK)),
        info.name,
    )


def select_matrices(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    select: str | Callable[[str, torch.Tensor], bool] = "blocks",
    *,
    include_embeddings: bool = False,
    include_head: bool = False,
) -> list[tuple[ParamInfo, torch.Tensor]]:
    """The (anatomy row, tensor) pairs :func:`analyze` looks at, each tensor once.

    Which rows (see :mod:`layerwise.anatomy` for the roles): ``"blocks"`` the block matrices
    (:meth:`~layerwise.anatomy.Anatomy.block_matrices`); ``"linear"`` every 2-D layer weight (block matrices,
    other matrices, input layers, readouts); ``"all"`` every tensor with >= 2 dimensions except multipliers;
    a callable ``select(name, tensor)`` over every (canonical name, tensor).  ``include_embeddings`` adds the
    token embeddings, ``include_head`` the readout (a tied embedding / LM head is one tensor, listed once).
    Modules: in model order; state dicts: by block, then operator (q, k, v, qkv, o, gate, up, down, ssm in/out),
    then name - the order of keys in a file does not matter.  The same matrices are selected from a module and
    from its state dict.  Unclassified tensors (role ``other``) with >= 2 dimensions that a named selection
    skips are listed in one warning.
    """
    if not isinstance(model_or_state_dict, (nn.Module, Mapping)):
        raise TypeError(
            f"analyze: expected an nn.Module or a state dict (Mapping[str, Tensor]), got "
            f"{type(model_or_state_dict).__name__}"
        )
    an = _anatomy.anatomy(model_or_state_dict)
    if select == "blocks":
        chosen = an.block_matrices()
    elif select == "linear":
        chosen = an.where(_LINEAR_ROLES)
    elif select == "all":
        chosen = [r for r in an if r.ndim >= 2 and r.role != "multiplier"]
    elif callable(select):
        chosen = [r for r in an if r.tensor is not None and select(r.name, r.tensor)]
    else:
        raise ValueError(f"analyze: select must be 'blocks', 'linear', 'all' or a callable, got {select!r}")
    if include_embeddings:
        chosen += an.where("embedding")
    if include_head:
        chosen += an.where("readout") + [r for r in an.where("embedding") if len(r.names) > 1]  # tied heads
    if isinstance(select, str) and select != "all":
        odd = [r for r in an.unclassified() if r.ndim >= 2]
        if odd:
            _anatomy.warn_once(
                f"analyze:{select}:{','.join(r.name for r in odd)}",
                f"analyze(select={select!r}) skips {len(odd)} tensor(s) it cannot classify: "
                + ", ".join(f"{r.name} {list(r.shape)}" for r in odd[:8])
                + (" ..." if len(odd) > 8 else "")
                + "; pass select='all' or a callable to analyse them",
            )
    if an.source == "state_dict":
        chosen = sorted(chosen, key=_sort_key)
    seen: set[int] = set()
    out = []
    for r in chosen:
        if id(r) not in seen and r.tensor is not None:  # anatomy() gives every row its tensor
            seen.add(id(r))
            out.append((r, r.tensor))
    return out


# ------------------------------------------------------------------------------------------------ analyze
def _chunks(mats: list[tuple[int, torch.Tensor]]) -> Iterable[list[tuple[int, torch.Tensor]]]:
    cur: list[tuple[int, torch.Tensor]] = []
    size = 0
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
    entries = select_matrices(
        model_or_state_dict, select, include_embeddings=include_embeddings, include_head=include_head
    )
    est_name = estimator if isinstance(estimator, str) else getattr(estimator, "__name__", "custom")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    mats: list[tuple[int, torch.Tensor]] = []
    for info, t in entries:
        name = info.name
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
        rows.append(
            {
                "name": name,
                "shape": shape,
                "module_type": module_label(info),
                "role": info.role,
                "layer": info.block,
                "fan_in": info.fan_in,
                "fan_out": info.fan_out,
                "n_eigs": min(shape),
                "estimator": est_name,
            }
        )
        mats.append((len(rows) - 1, t.detach()))

    eigs: list[torch.Tensor] = []  # one per row: every row has a matrix in mats, in row order
    for chunk in _chunks(mats):
        eigs += gram_eigvals([t for _, t in chunk], dtype, workers=workers, solver=solver)

    if not eigs:
        fit = TailFit(torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int64), [])
    elif estimator == "hill":
        fit = hill_fit(eigs, min_n=min_n)
    elif estimator == "ks":
        fit = ks_alpha(eigs, xmin_range, min_n=min_n)
    elif not isinstance(estimator, str):  # a str is 'hill' or 'ks' (checked above)
        fit = estimator(eigs)
        if not isinstance(fit, TailFit):
            raise TypeError(f"analyze: a custom estimator must return a TailFit, got {type(fit).__name__}")
    alphas, xmins, kss, n_tails = fit.tensors()
    for k, (row, e) in enumerate(zip(rows, eigs)):
        a = float(alphas[k])
        row["alpha"] = a
        row["xmin"] = float(xmins[k])
        row["ks"] = float(kss[k])
        row["n_tail"] = int(n_tails[k])
        reason = fit.reasons[k] if k < len(fit.reasons) else None
        if shape_correction is not None:
            row["alpha_corrected"] = (
                float(
                    shape_corrected_alpha(
                        a, row["shape"], est_name if est_name in ("hill", "ks") else "hill", mode=shape_correction
                    )
                )
                if math.isfinite(a)
                else math.nan
            )
        row.update(spectral_metrics(e, a, top_k=top_k))
        if reason is not None and reason.startswith("non-finite"):
            reason = "non-finite entries (NaN/Inf) in the matrix or its Gram matrix"
        row["reason"] = reason
    report = SpectralReport(
        rows=rows,
        skipped=skipped,
        estimator=est_name,
        settings={
            "select": select if isinstance(select, str) else getattr(select, "__name__", "callable"),
            "include_embeddings": include_embeddings,
            "include_head": include_head,
            "min_n": min_n,
            "xmin_range": list(xmin_range) if xmin_range is not None else None,
            "shape_correction": shape_correction,
            "dtype": str(dtype).replace("torch.", ""),
        },
        eigs={r["name"]: e.cpu() for r, e in zip(rows, eigs)} if keep_eigs else {},
    )
    report.elapsed_s = time.perf_counter() - t0
    return report
