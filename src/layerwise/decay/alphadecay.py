"""AlphaDecay (He et al., arXiv 2506.14562): per-module weight decay from the heavy-tail exponent α of each
weight matrix's spectrum.  Formulas, defaults and every known difference from the authors' code:
``docs/methods.md`` §1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise.decay._base import (
    PerMatrixController,
    Select,
    authors_modules,
    layout_units,
)
from layerwise.decay.mapping import ASSIGNS, S1, S2, assign_decays

__all__ = ["AlphaDecay", "estimate_alphas", "metric_scores", "authors_modules", "METRICS", "MODULE_SETS"]

_ESTIMATORS = ("hill", "ks")
#: per-matrix scores the map can take as input (``metric=``)
METRICS = ("alpha", "alphahat", "spectral_norm", "stable_rank", "entropy")
#: module sets AlphaDecay can analyse (``modules=``)
MODULE_SETS = ("blocks", "authors")
_TIMINGS = ("after", "before")
_UNTUNED = ("keep", "wd0")
_ENTROPY_EPS = 6e-5  # the authors' constant: numerical-rank threshold on σ and additive floor on p


def metric_scores(eigs: Sequence[torch.Tensor] | torch.Tensor, alpha: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-matrix score ``metric`` from ascending Gram eigenvalues ``λ`` (= σ²) and α; float64 CPU vector.

    The definitions are those of the AlphaDecay authors' code (``docs/methods.md`` §1), computed in float64:

    * ``alpha``: α itself;
    * ``alphahat``: ``softplus(α · log10 λ_max)`` (``log10`` of a non-positive ``λ_max`` reads −10);
    * ``spectral_norm``: ``λ_max`` — the *squared* largest singular value, as the authors' code names it;
    * ``stable_rank``: ``Σλ / λ_max``;
    * ``entropy``: with ``σ = √λ``, ``r = #{σ > 6e-5}`` and ``p = λ / Σλ + 6e-5``:
      ``−Σ p ln p / ln(r + 6e-5)`` (the authors' floor on ``p``; :func:`layerwise.spectral.matrix_entropy`
      is the plain normalised entropy).

    NaN where undefined (a zero matrix, non-finite eigenvalues).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    if metric == "alpha":
        return a.clone()
    out = torch.full((len(eigs),), float("nan"), dtype=torch.float64)
    for i, e in enumerate(eigs):
        e = e.detach().to("cpu", torch.float64).clamp_min(0.0)
        if e.numel() == 0 or not bool(torch.isfinite(e).all()):
            continue
        lmax = float(e.max())
        total = float(e.sum())
        if metric == "spectral_norm":
            out[i] = lmax
        elif metric == "stable_rank":
            out[i] = total / lmax if lmax > 0 else math.nan
        elif metric == "alphahat":
            x = float(a[i]) * (math.log10(lmax) if lmax > 0 else -10.0)
            out[i] = float(torch.nn.functional.softplus(torch.tensor(x, dtype=torch.float64)))
        else:  # entropy
            if not total > 0:
                continue
            rank = int((e.sqrt() > _ENTROPY_EPS).sum())
            p = e / total + _ENTROPY_EPS
            out[i] = float(-(p * p.log()).sum()) / math.log(rank + _ENTROPY_EPS)
    return out


def estimate_alphas(
    weights: list[torch.Tensor], estimator: str = "hill", shape_correction: bool = False, metric: str = "alpha"
) -> dict[str, torch.Tensor]:
    """α of each matrix through :mod:`layerwise.spectral` (one batched Gram-eigenvalue pass).

    Returns float64 CPU tensors: ``"alpha"`` (always), for ``estimator="ks"`` ``"xmin"``, ``"ks"``, and for
    ``metric`` other than ``"alpha"`` that score as ``"metric"`` (see :func:`metric_scores`).
    ``shape_correction=True`` replaces α by :func:`layerwise.spectral.shape_corrected_alpha` (``"difference"``
    mode: ``α − α_noise(shape) + 2``, so Gaussian noise of any shape reads 2).
    One host synchronisation per call.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _estimate_sharded(weights, estimator, shape_correction, metric)
    return _estimate_local(weights, estimator, shape_correction, metric)


def _estimate_local(
    weights: list[torch.Tensor], estimator: str, shape_correction: bool, metric: str = "alpha"
) -> dict[str, torch.Tensor]:
    from layerwise import spectral

    if not weights:
        out0 = {"alpha": torch.zeros(0, dtype=torch.float64)}
        if estimator == "ks":
            out0.update(xmin=torch.zeros(0, dtype=torch.float64), ks=torch.zeros(0, dtype=torch.float64))
        if metric != "alpha":
            out0["metric"] = torch.zeros(0, dtype=torch.float64)
        return out0
    eigs = spectral.gram_eigvals([w.detach() for w in weights])
    out: dict[str, torch.Tensor] = {}
    if estimator == "hill":
        fit = spectral.hill_fit(eigs)
    else:
        fit = spectral.ks_alpha(eigs)
        out["xmin"] = _to_vec(fit.xmin)
        out["ks"] = _to_vec(fit.ks)
    alpha = _to_vec(fit.alpha)
    if shape_correction:
        alpha = torch.stack(
            [
                torch.as_tensor(
                    spectral.shape_corrected_alpha(float(a), tuple(w.shape), estimator), dtype=torch.float64
                )
                for a, w in zip(alpha.tolist(), weights)
            ]
        )
    out["alpha"] = alpha
    if metric != "alpha":
        out["metric"] = metric_scores(eigs, alpha, metric)
    return out


def owners(shapes: list[tuple[int, ...]], world_size: int) -> list[int]:
    """Owner rank of each matrix (see :func:`layerwise._sharding.owner_ranks`), the same on every rank."""
    from layerwise._sharding import owner_ranks

    return owner_ranks(shapes, world_size)


def _estimate_sharded(
    weights: list[torch.Tensor], estimator: str, shape_correction: bool, metric: str = "alpha"
) -> dict[str, torch.Tensor]:
    """Distributed α: each matrix is analysed on one owner rank and the small result vectors are summed.

    Replicated weights (DDP) need no communication: the owner uses its own copy.  FSDP2-sharded weights
    (DTensor, row-sharded) are gathered to their owner only (``dist.gather``), never to every rank, so one
    recomputation moves each matrix once.  Every rank ends with identical α.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = [tuple(w.shape) for w in weights]
    own = owners(shapes, world)
    mine: list[torch.Tensor] = []
    mine_idx: list[int] = []
    for i, w in enumerate(weights):
        w = w.detach()
        if hasattr(w, "to_local"):  # DTensor shard: gather rows to the owner
            local = w.to_local()
            rows = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
            all_rows = [torch.zeros_like(rows) for _ in range(world)]
            dist.all_gather(all_rows, rows)
            n_max = max(int(r) for r in all_rows)
            padded = local.new_zeros((n_max,) + tuple(local.shape[1:]))
            padded[: local.shape[0]] = local
            bucket = [torch.empty_like(padded) for _ in range(world)] if rank == own[i] else None
            dist.gather(padded, bucket, dst=own[i])
            if bucket is not None:  # this rank owns the matrix
                full = torch.cat([b[: int(r)] for b, r in zip(bucket, all_rows)])
                mine.append(full)
                mine_idx.append(i)
        elif rank == own[i]:
            mine.append(w)
            mine_idx.append(i)
    est = _estimate_local(mine, estimator, shape_correction, metric)
    out: dict[str, torch.Tensor] = {}
    device = weights[0].device if weights else torch.device("cpu")
    keys = ["alpha"] + (["xmin", "ks"] if estimator == "ks" else []) + (["metric"] if metric != "alpha" else [])
    packed = torch.zeros(len(keys), len(weights), dtype=torch.float64)
    for k, key in enumerate(keys):
        for j, i in enumerate(mine_idx):
            packed[k, i] = est[key][j]
    packed = packed.to(device if device.type != "meta" else "cpu")
    dist.all_reduce(packed)  # one small all-reduce: only the owner's entries are non-zero
    packed = packed.cpu()
    for k, key in enumerate(keys):
        out[key] = packed[k]
    return out


def _to_vec(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).reshape(-1)
    return torch.stack([torch.as_tensor(v).detach().to("cpu", torch.float64).reshape(()) for v in x])


class AlphaDecay(PerMatrixController):
    """Module-wise weight decay from the heavy-tail exponent α of each weight matrix (AlphaDecay).

    At construction (from the initial weights) and every ``interval`` optimizer steps the controller computes
    α (or another per-matrix score, ``metric``) for every analysed matrix and sets each module's weight decay
    by one map over all analysed modules (``assign``; default the global linear map
    :func:`~layerwise.decay.mapping.linear_decay_map`: ``[α_min, α_max] → [s1·wd0, s2·wd0]``, increasing in
    α: heavier tail = smaller α = less decay).  All-equal α gives every module ``wd0``; a module whose score
    is not finite (degenerate spectrum) gets ``wd0``.  Between recomputations nothing changes.  Steps are
    counted by optimizer step hooks (``GradScaler``-skipped steps do not count).

    Weight decay is PyTorch's convention and is applied *by the optimizer*: ``θ ← θ·(1 − lr·λ)`` for
    decoupled optimizers (``AdamW``, ``torch.optim.Muon``, AlphaAdam), ``g ← g + λ·θ`` for torch ``Adam``
    (coupled L2, the paper's main table).

    Design: the controller never restructures the optimizer; it only writes ``group["weight_decay"]`` (and
    records each controlled group's base decay once as ``group["initial_weight_decay"]``, as torch's LR
    schedulers record ``initial_lr``).  So each analysed matrix must sit in a parameter group of its own (with
    ``modules="authors"``, shared at most with its module's bias), which :func:`layerwise.param_groups` builds::

        groups = lw.param_groups(model, lr=3e-3, weight_decay=0.1, per_matrix=True)  # "authors" for modules="authors"
        opt = torch.optim.AdamW(groups)
        decay = lw.AlphaDecay(opt, model)

    Any other layout raises :class:`~layerwise.decay.GroupLayoutError` naming the shared tensors and showing
    that call (:meth:`per_matrix_for` gives the ``per_matrix`` value for given options).  Build order does not
    matter: the controller can be created before or after the LR scheduler, and before or after
    ``optimizer.load_state_dict`` (the base decay travels with the optimizer's groups; the controller's own
    state, :meth:`state_dict`, restores α and the decays).

    **Module set** (``modules``; ``docs/methods.md`` §1 has the table of differences from the authors):

    * ``"blocks"`` (default): every ``nn.Linear`` weight inside the transformer blocks (or ``select``);
      biases and all other parameters keep their groups' decay; no size threshold.
    * ``"authors"``: the authors' ``modulewise_AlphaDecay``: every ``nn.Linear`` in model order except the
      first and the last (:func:`authors_modules`: on a LLaMA, layer 0's ``q_proj`` and ``lm_head`` are not
      analysed), matrices with fewer than ``min_eigs`` (default 50) eigenvalues skipped, an analysed module's
      **bias gets its module's decay**, and every other parameter (norms, embeddings, the skipped matrices)
      is set to ``wd0`` (``untuned="wd0"``).  With ``metric="alpha"`` and ``assign="linear"`` this gives the
      authors' decays on the same weights (tested to 1e-5 against a float64 re-implementation).

    Why ``"blocks"`` is the default: the authors drop the first and last ``nn.Linear`` through a generic
    "remove first / last layer" switch of their code (a CNN's first convolution and classifier); on a
    transformer it drops one block matrix, layer 0's ``q_proj``, for no stated reason.  Including it changes
    the other decays only through the map's extremes: a trained layer-0 ``q_proj`` often has the smallest α
    and then sets α_min.  Measured (``benchmarks/authors_modules.py``, 50 AdamW steps on Shakespeare, the lab's
    ``tiny`` model): layer 0's ``q_proj`` had the smallest α (1.898; 1.907 without it), and the authors' set
    moves the attention decays by −2.3 … −5.0 % and the MLP decays by ≤ 0.3 %; on an HF ``LlamaForCausalLM``
    of the same shape α_min was in layer 2 and the decays were identical.  The shift is the gap between the
    two smallest α over the α range (``docs/methods.md`` §1).

    Args:
        optimizer: a ``torch.optim.Optimizer`` holding every analysed tensor.
        model: the model (names are its canonical parameter names).
        interval: optimizer steps between recomputations (≥ 1; paper: 500).
        s1, s2: decay multipliers at the smallest / largest score for ``assign="linear"`` (``s1 <= s2``;
            authors: 0.6666 and 3 with Adam + coupled L2, 5 with AdamW).
        wd0: base decay; ``None`` = the ``weight_decay`` of the analysed matrices' groups (must be one
            value); ``"group"`` = each module's own group decay as its base; or a number.
        estimator: ``"hill"`` (paper: fixed ``xmin = λ[N//2]``) or ``"ks"`` (KS-distance xmin search).
        preserve_mean: rescale so the parameter-weighted mean decay equals ``wd0`` (the paper's map gives
            ≈ 2× ``wd0`` on average, which confounds comparisons).
        ema: ``None`` or β in [0, 1): the score used for the map is smoothed over recomputations,
            ``ᾱ ← β·ᾱ + (1 − β)·α`` (initialised with the first value; a non-finite value keeps ᾱ).
        shape_correction: use ``α − α_noise(shape) + 2`` (:func:`layerwise.spectral.shape_corrected_alpha`)
            so square and rectangular matrices are comparable (only with ``metric`` ``"alpha"``/``"alphahat"``).
        select: which matrices to analyse with ``modules="blocks"`` (default: the block matrices of
            :func:`layerwise.anatomy`; a regex, a callable ``(name, param) -> bool`` or a list of names; see
            ``controlled_matrices``).
        modules: ``"blocks"`` or ``"authors"`` (above).
        metric: the per-matrix score the map takes (:func:`metric_scores`): ``"alpha"`` (default),
            ``"alphahat"``, ``"spectral_norm"`` (λ_max = σ_max²), ``"stable_rank"``, ``"entropy"``.
        assign: ``"linear"`` (default), ``"sqrt"``, ``"log2"`` or ``"sigmoid"`` (per transformer block,
            ``2·wd0·σ(slope·z)``; see :func:`~layerwise.decay.mapping.assign_decays`).
        slope: the sigmoid's slope for ``assign="sigmoid"`` (authors: 4).
        min_eigs: matrices with fewer eigenvalues (``min(out, in)``) are not analysed; ``None`` = 50 for
            ``"authors"``, 0 for ``"blocks"``.
        untuned: ``"keep"`` (the other parameters keep their groups' decay) or ``"wd0"`` (every group
            without an analysed tensor is set to ``wd0``, as the authors' "untuned" group); ``None`` = ``"wd0"``
            for ``"authors"``, ``"keep"`` for ``"blocks"``.
        timing: ``"after"`` (default): recompute right after every ``interval``-th step, from the weights it
            produced, new decays from the next step on; ``"before"`` (the authors' loop): recompute right
            before every ``interval``-th step, from the weights of ``interval − 1`` steps later, used by that
            step already.
    """

    name = "alphadecay"
    interval: int

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        interval: int = 500,
        s1: float = S1,
        s2: float = S2,
        *,
        wd0: float | str | None = None,
        estimator: str = "hill",
        preserve_mean: bool = False,
        ema: float | None = None,
        shape_correction: bool = False,
        select: Select = None,
        modules: str = "blocks",
        metric: str = "alpha",
        assign: str = "linear",
        slope: float = 4.0,
        min_eigs: int | None = None,
        untuned: str | None = None,
        timing: str = "after",
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        if not (math.isfinite(s1) and math.isfinite(s2)) or s1 < 0:
            raise ValueError(f"s1 and s2 must be finite and >= 0, got s1={s1}, s2={s2}")
        if s1 > s2:
            raise ValueError(f"s1 must be <= s2 (decay at α_min <= decay at α_max), got s1={s1} > s2={s2}")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
        if ema is not None and not (0.0 <= float(ema) < 1.0):
            raise ValueError(f"ema must be None or in [0, 1), got {ema!r}")
        if modules not in MODULE_SETS:
            raise ValueError(f"modules must be one of {MODULE_SETS}, got {modules!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if assign not in ASSIGNS:
            raise ValueError(f"assign must be one of {ASSIGNS}, got {assign!r}")
        if not (math.isfinite(slope) and slope >= 0):
            raise ValueError(f"slope must be finite and >= 0, got {slope!r}")
        if timing not in _TIMINGS:
            raise ValueError(f"timing must be one of {_TIMINGS}, got {timing!r}")
        if shape_correction and metric not in ("alpha", "alphahat"):
            raise ValueError(f"shape_correction applies to metric 'alpha' or 'alphahat', not {metric!r}")
        authors = modules == "authors"
        if min_eigs is None:
            min_eigs = 50 if authors else 0
        if isinstance(min_eigs, bool) or not isinstance(min_eigs, int) or min_eigs < 0:
            raise ValueError(f"min_eigs must be an integer >= 0, got {min_eigs!r}")
        untuned = untuned if untuned is not None else ("wd0" if authors else "keep")
        if untuned not in _UNTUNED:
            raise ValueError(f"untuned must be one of {_UNTUNED}, got {untuned!r}")
        if authors and select is not None:
            raise ValueError("select applies to modules='blocks'; modules='authors' fixes the module set")
        per_matrix = self.per_matrix_for(modules=modules, select=select)
        # too few eigenvalues: not analysed (with modules="authors" it joins the untuned parameters)
        units = layout_units(optimizer, model, per_matrix, "AlphaDecay", lambda u: min(u.weight.shape) >= min_eigs)
        if not units:
            raise ValueError(
                "modules='authors': no nn.Linear (other than the first and the last) has >= "
                f"{min_eigs} eigenvalues (min_eigs) and is trainable; nothing to analyse"
                if authors
                else f"no selected weight matrix has >= {min_eigs} eigenvalues (min_eigs)"
            )
        super().__init__(optimizer, model)
        self.interval = interval
        self.s1, self.s2 = float(s1), float(s2)
        self.estimator = estimator
        self.preserve_mean = bool(preserve_mean)
        self.ema = None if ema is None else float(ema)
        self.shape_correction = bool(shape_correction)
        self.modules, self.metric, self.assign, self.slope = modules, metric, assign, float(slope)
        self.min_eigs, self.untuned, self.timing = min_eigs, untuned, timing
        one_base = "untuned='wd0' sets every other parameter to one base decay (or pass untuned='keep')"
        self._adopt(units, wd0, one_base=one_base if untuned == "wd0" else None)
        an = _anatomy.anatomy(model)
        # what the map needs besides the scores: each matrix's block (sigmoid) and size (preserve_mean)
        self._map: dict[str, Any] = dict(
            blocks=[(an.by_name(n).stack, an.by_name(n).block) for n in self.names],
            numel=[sum(t.numel() for t in u.tensors) for u in units],
            slope=self.slope,
            preserve_mean=self.preserve_mean,
        )
        n = len(self.names)
        nan = float("nan")
        self.alpha_raw = torch.full((n,), nan, dtype=torch.float64)  # latest estimate of α
        self.alpha = torch.full((n,), nan, dtype=torch.float64)  # the α used (EMA-smoothed if ema)
        self.score_raw = self.alpha_raw.clone()  # latest score (= α for metric="alpha")
        self.score = self.alpha.clone()  # the score the map used (EMA-smoothed if ema)
        self.extra: dict[str, torch.Tensor] = {}
        self.decays = torch.tensor(self.wd0, dtype=torch.float64)
        self.recompute()
        if timing == "before":
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
        self._attach()

    # -------------------------------------------------------------------------------------------------
    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if (self.step + 1) % self.interval == 0:
            self.recompute()

    def after_step(self) -> None:
        if self.timing == "after" and self.step % self.interval == 0:
            self.recompute()

    def _smooth(self, old: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        if self.ema is None or self.version == 0:
            return raw.clone()
        smoothed = self.ema * old + (1.0 - self.ema) * raw
        keep_old = ~torch.isfinite(raw)
        smoothed[keep_old] = old[keep_old]
        take_new = ~torch.isfinite(old)
        smoothed[take_new] = raw[take_new]
        return smoothed

    @torch.no_grad()
    def recompute(self) -> None:
        """Estimate the scores from the current weights and set every analysed module's decay (one host sync)."""
        est = estimate_alphas(self._params, self.estimator, self.shape_correction, self.metric)
        raw = est.pop("alpha")
        score_raw = est.pop("metric", raw)
        self.extra = est
        self.alpha = self._smooth(self.alpha, raw)
        self.alpha_raw = raw
        self.score = self.alpha.clone() if self.metric == "alpha" else self._smooth(self.score, score_raw)
        self.score_raw = score_raw.clone()
        self.decays = assign_decays(self.score, self.wd0, self.assign, self.s1, self.s2, **self._map)
        self._apply()
        self.version += 1
        self.last_update_step = self.step

    def _apply(self) -> None:
        self.write_decays(self.units, self.decays.tolist())
        if self.untuned == "wd0":
            self.write_untuned(self.units, self.wd0[0])

    # -------------------------------------------------------------------------------------------------
    def table(self) -> list[dict]:
        """One row per analysed matrix: ``name`` (canonical), ``alpha`` (the α used; ``None`` if not finite),
        ``alpha_raw`` (latest estimate), ``weight_decay`` (current λ), for ``estimator="ks"`` ``xmin`` and
        ``ks`` (fit quality), for another ``metric`` ``score`` (the value the map used), and with
        ``modules="authors"`` ``bias`` (the canonical name of the module's bias, which has the same decay,
        or ``None``)."""
        rows = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {
                "name": name,
                "alpha": _finite_or_none(self.alpha[i]),
                "alpha_raw": _finite_or_none(self.alpha_raw[i]),
                "weight_decay": float(self.decays[i]),
            }
            if self.metric != "alpha":
                row["score"] = _finite_or_none(self.score[i])
            if self.modules == "authors":
                row["bias"] = self.units[i].bias_name
            for key, vec in self.extra.items():
                row[key] = _finite_or_none(vec[i])
            rows.append(row)
        return rows

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            names=list(self.names),
            alpha=self.alpha.tolist(),
            alpha_raw=self.alpha_raw.tolist(),
            score=self.score.tolist(),
            score_raw=self.score_raw.tolist(),
            weight_decay=self.decays.tolist(),
            wd0=[float(w) for w in self.wd0],
            extra={k: v.tolist() for k, v in self.extra.items()},
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore step count, α and scores (raw and smoothed), decays; the decays are written to the optimizer."""
        if list(state.get("names", [])) != self.names:
            raise ValueError(
                "AlphaDecay state dict was saved for different matrices: "
                f"saved {state.get('names')!r}, now {self.names!r}"
            )
        super().load_state_dict(state)
        self.alpha = torch.tensor(state["alpha"], dtype=torch.float64)
        self.alpha_raw = torch.tensor(state["alpha_raw"], dtype=torch.float64)
        self.score = torch.tensor(state.get("score", state["alpha"]), dtype=torch.float64)
        self.score_raw = torch.tensor(state.get("score_raw", state["alpha_raw"]), dtype=torch.float64)
        self.decays = torch.tensor(state["weight_decay"], dtype=torch.float64)
        if "wd0" in state:
            self.wd0 = [float(w) for w in state["wd0"]]
        self.extra = {k: torch.tensor(v, dtype=torch.float64) for k, v in state.get("extra", {}).items()}
        self._apply()


def _finite_or_none(x: torch.Tensor) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None
