"""AlphaDecay (He et al., arXiv 2506.14562): per-module weight decay from the heavy-tail exponent α of each
weight matrix's spectrum.  See METHODS.md §1.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from layerwise.decay._base import (
    DecayController,
    Select,
    check_in_optimizer,
    resolve_wd0,
    controlled_matrices,
    split_groups,
)
from layerwise.decay.mapping import linear_decay_map

__all__ = ["AlphaDecay", "estimate_alphas"]

_ESTIMATORS = ("hill", "ks")


def estimate_alphas(
    weights: list[torch.Tensor], estimator: str = "hill", shape_correction: bool = False
) -> dict[str, torch.Tensor]:
    """α of each matrix through :mod:`layerwise.spectral` (one batched Gram-eigenvalue pass).

    Returns float64 CPU tensors: ``"alpha"`` (always) and, for ``estimator="ks"``, ``"xmin"``, ``"ks"``.
    ``shape_correction=True`` replaces α by :func:`layerwise.spectral.shape_corrected_alpha` (``"difference"``
    mode: ``α − α_noise(shape) + 2``, so Gaussian noise of any shape reads 2).
    One host synchronisation per call.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _estimate_sharded(weights, estimator, shape_correction)
    return _estimate_local(weights, estimator, shape_correction)


def _estimate_local(weights: list[torch.Tensor], estimator: str, shape_correction: bool) -> dict[str, torch.Tensor]:
    from layerwise import spectral

    if not weights:
        return {"alpha": torch.zeros(0, dtype=torch.float64)}
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
                torch.as_tensor(spectral.shape_corrected_alpha(float(a), tuple(w.shape), estimator), dtype=torch.float64)
                for a, w in zip(alpha.tolist(), weights)
            ]
        )
    out["alpha"] = alpha
    return out


def owners(shapes: list[tuple[int, ...]], world_size: int) -> list[int]:
    """Owner rank of each matrix (see :func:`layerwise._sharding.owner_ranks`), the same on every rank."""
    from layerwise._sharding import owner_ranks

    return owner_ranks(shapes, world_size)


def _estimate_sharded(weights: list[torch.Tensor], estimator: str, shape_correction: bool) -> dict[str, torch.Tensor]:
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
            if rank == own[i]:
                full = torch.cat([b[: int(r)] for b, r in zip(bucket, all_rows)])
                mine.append(full)
                mine_idx.append(i)
        elif rank == own[i]:
            mine.append(w)
            mine_idx.append(i)
    est = _estimate_local(mine, estimator, shape_correction)
    out: dict[str, torch.Tensor] = {}
    device = weights[0].device if weights else torch.device("cpu")
    keys = ["alpha"] + (["xmin", "ks"] if estimator == "ks" else [])
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


class AlphaDecay(DecayController):
    """Module-wise weight decay from the heavy-tail exponent α of each weight matrix (AlphaDecay).

    At construction (from the initial weights) and right after every ``interval``-th optimizer step
    (from the weights that step produced) the controller computes α for every analysed matrix and sets
    each one's weight decay by one global linear map (:func:`~layerwise.decay.mapping.linear_decay_map`):
    ``[α_min, α_max] → [s1·wd0, s2·wd0]``, increasing in α (heavier tail = smaller α = less decay).
    All-equal α gives every module ``wd0``; a module whose α is not finite (degenerate spectrum) gets
    ``wd0``.  New decays apply from the next optimizer step; between recomputations nothing changes.
    Steps are counted by a step post-hook on the optimizer (``GradScaler``-skipped steps do not count).

    Weight decay is PyTorch's convention and is applied *by the optimizer*: ``θ ← θ·(1 − lr·λ)`` for
    decoupled optimizers (``AdamW``, ``torch.optim.Muon``, AlphaAdam), ``g ← g + λ·θ`` for torch ``Adam``
    (coupled L2, the paper's main table).

    Design: the controller **splits parameter groups** at construction — each analysed matrix gets a group
    of its own that copies every other key of its original group (``lr``, ``betas``, ``param_names``,
    ``lr_scale``, ``group`` ...), placed right after what remains of the original group — and then only
    writes ``group["weight_decay"]``.  So it works with any optimizer that reads ``weight_decay`` from its
    groups, including wrappers whose ``param_groups`` concatenates inner optimizers' groups.  Consequences:

    * create the controller **before the LR scheduler** (schedulers record one base LR per group; a
      ``ValueError`` is raised if a split is needed and a scheduler is already attached);
    * create it **before** ``optimizer.load_state_dict`` on resume (the optimizer's state dict lists
      groups by position); optimizer state itself is keyed by parameter and survives the split;
    * modules not analysed stay in their original groups and keep their decay (``wd0``).

    Args:
        optimizer: a ``torch.optim.Optimizer`` holding every analysed matrix.
        model: the model (names are its canonical parameter names).
        interval: optimizer steps between recomputations (≥ 1; paper: 500).
        s1, s2: decay multipliers at α_min and α_max (``s1 <= s2``; paper: 0.6666, 3; 5 for AdamW runs).
        wd0: base decay; ``None`` = the ``weight_decay`` of the analysed matrices' groups (must be one
            value); ``"group"`` = each module's own group decay as its base; or a number.
        estimator: ``"hill"`` (paper: fixed ``xmin = λ[N//2]``) or ``"ks"`` (KS-distance xmin search).
        preserve_mean: rescale so the parameter-weighted mean decay equals ``wd0`` (the paper's map gives
            ≈ 2× ``wd0`` on average, which confounds comparisons).
        ema: ``None`` or β in [0, 1): α used for the map is smoothed over recomputations,
            ``ᾱ ← β·ᾱ + (1 − β)·α`` (initialised with the first α; a non-finite α keeps ᾱ).
        shape_correction: use ``α − α_noise(shape) + 2`` (:func:`layerwise.spectral.shape_corrected_alpha`;
            α_noise = what the estimator reads on Gaussian noise of that shape, cached per shape) so square
            and rectangular matrices are comparable (uncorrected, noise reads ≈ 2.13 square vs ≈ 3.0 at 1:2.7).
        select: which matrices to analyse (default: the block matrices of :func:`layerwise.anatomy`;
            a regex, a callable ``(name, param) -> bool`` or a list of names; see ``controlled_matrices``).

    Note: the authors' code skips layer 0's ``q_proj`` by accident; we analyse it.
    """

    name = "alphadecay"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        interval: int = 500,
        s1: float = 0.6666,
        s2: float = 3.0,
        *,
        wd0: float | str | None = None,
        estimator: str = "hill",
        preserve_mean: bool = False,
        ema: float | None = None,
        shape_correction: bool = False,
        select: Select = None,
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
        matrices = controlled_matrices(model, select)
        check_in_optimizer(optimizer, matrices)
        super().__init__(optimizer, model)
        self.interval = interval
        self.s1, self.s2 = float(s1), float(s2)
        self.estimator = estimator
        self.preserve_mean = bool(preserve_mean)
        self.ema = None if ema is None else float(ema)
        self.shape_correction = bool(shape_correction)
        self.names = [n for n, _ in matrices]
        self._params = [p for _, p in matrices]
        self._numel = [p.numel() for p in self._params]
        groups = split_groups(optimizer, self._params)
        self.wd0 = resolve_wd0(groups, wd0, self.names)
        n = len(self.names)
        nan = float("nan")
        self.alpha_raw = torch.full((n,), nan, dtype=torch.float64)  # latest estimate
        self.alpha = torch.full((n,), nan, dtype=torch.float64)  # the α the map used (EMA-smoothed if ema)
        self.extra: dict[str, torch.Tensor] = {}
        self.decays = torch.tensor(self.wd0, dtype=torch.float64)
        self.recompute()
        self._attach()

    # -------------------------------------------------------------------------------------------------
    def after_step(self) -> None:
        if self.step % self.interval == 0:
            self.recompute()

    @torch.no_grad()
    def recompute(self) -> None:
        """Estimate α from the current weights and set every analysed module's decay (one host sync)."""
        est = estimate_alphas(self._params, self.estimator, self.shape_correction)
        raw = est.pop("alpha")
        self.extra = est
        self.alpha_raw = raw
        if self.ema is None or self.version == 0:
            self.alpha = raw.clone()
        else:
            smoothed = self.ema * self.alpha + (1.0 - self.ema) * raw
            keep_old = ~torch.isfinite(raw)
            smoothed[keep_old] = self.alpha[keep_old]
            take_new = ~torch.isfinite(self.alpha)
            smoothed[take_new] = raw[take_new]
            self.alpha = smoothed
        self.decays = linear_decay_map(
            self.alpha, self.wd0, self.s1, self.s2, numel=self._numel, preserve_mean=self.preserve_mean
        )
        self._apply()
        self.version += 1
        self.last_update_step = self.step

    def _apply(self) -> None:
        for g, wd in zip(self.current_groups(self._params), self.decays.tolist()):
            g["weight_decay"] = wd

    # -------------------------------------------------------------------------------------------------
    def table(self) -> list[dict]:
        """One row per analysed matrix: ``name`` (canonical), ``alpha`` (the α the map used; ``None`` if not
        finite), ``alpha_raw`` (latest estimate), ``weight_decay`` (current λ), and for ``estimator="ks"``
        ``xmin`` and ``ks`` (fit quality)."""
        rows = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {
                "name": name,
                "alpha": _finite_or_none(self.alpha[i]),
                "alpha_raw": _finite_or_none(self.alpha_raw[i]),
                "weight_decay": float(self.decays[i]),
            }
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
            weight_decay=self.decays.tolist(),
            wd0=[float(w) for w in self.wd0],
            extra={k: v.tolist() for k, v in self.extra.items()},
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore step count, α (raw and smoothed), decays; the decays are written to the optimizer."""
        if list(state.get("names", [])) != self.names:
            raise ValueError(
                "AlphaDecay state dict was saved for different matrices: "
                f"saved {state.get('names')!r}, now {self.names!r}"
            )
        super().load_state_dict(state)
        self.alpha = torch.tensor(state["alpha"], dtype=torch.float64)
        self.alpha_raw = torch.tensor(state["alpha_raw"], dtype=torch.float64)
        self.decays = torch.tensor(state["weight_decay"], dtype=torch.float64)
        if "wd0" in state:
            self.wd0 = [float(w) for w in state["wd0"]]
        self.extra = {k: torch.tensor(v, dtype=torch.float64) for k, v in state.get("extra", {}).items()}
        self._apply()


def _finite_or_none(x: torch.Tensor) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None
