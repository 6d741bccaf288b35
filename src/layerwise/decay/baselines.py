"""Baselines for AlphaDecay, with the same interface (``(optimizer, model, ...)``, ``table()``, ``state_dict()``).

* :class:`UniformDecay` — no-op: every group keeps its decay (the usual AdamW run).
* :class:`TypeDecay` — fixed multipliers per module type (attention ×0.6666, MLP ×3), no spectra: the
  cheap ablation that tells whether AlphaDecay's spectra matter beyond the attention/MLP split.
* :class:`AWD` — adaptive weight decay, Ghiasi et al. (NeurIPS 2023), Algorithm 1.
* :class:`AdaDecay` — Nakamura & Hong (2019) at module level; defaults as the AlphaDecay authors ran it.

Formulas, defaults and the differences from the AlphaDecay authors' baselines: ``docs/methods.md`` §1.

Weight decay is PyTorch's convention (coupled lr·λ): a decoupled step does θ ← θ·(1 − lr·λ), a coupled
(L2) step adds λ·θ to the gradient.  Every controller only writes ``group["weight_decay"]``, and the optimizer
applies it as it does (coupled for torch ``Adam``/``SGD``, decoupled for ``AdamW``/``Muon``/AlphaAdam).
``AWD`` and ``AdaDecay`` compute λ from the gradients of the step about to be taken, so they write it in a
step *pre*-hook (after gradient clipping and unscaling, before the update); turning the λ computed on the
parameters' device into the float a group holds costs one host synchronisation each time it changes (AWD:
every step; AdaDecay: every ``interval`` steps).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise import names as _names
from layerwise._sharding import global_norms
from layerwise.decay._base import (
    DecayController,
    PerMatrixController,
    Select,
    base_decay,
    check_in_optimizer,
    controlled_units,
    layout_units,
    param_locations,
)
from layerwise.decay.mapping import S1, S2

__all__ = ["UniformDecay", "TypeDecay", "AWD", "AdaDecay"]

#: the AlphaDecay authors' AWD runs use λ_awd = 100 · wd0
AUTHORS_AWD_FACTOR = 100.0
_NORMS = ("raw", "rms")

#: anatomy operators TypeDecay treats as attention / MLP matrices
ATTENTION_OPERATORS = ("q", "k", "v", "o", "qkv")
MLP_OPERATORS = ("gate", "up", "gate_up", "down")


def _group_names(group: dict, by_id: dict[int, str]) -> list[str]:
    if "param_names" in group:
        return [_names.canonical_name(n) for n in group["param_names"]]
    return [by_id.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in group["params"]]


class UniformDecay(DecayController):
    """No-op baseline: every group keeps its weight decay.  ``table()`` lists the analysed matrices'
    current decays (``alpha`` is ``None``) so runs log the same columns as AlphaDecay."""

    name = "uniform"

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, select: Select = None) -> None:
        units = controlled_units(model, True if select is None else select, controller="UniformDecay")
        check_in_optimizer(optimizer, units)
        super().__init__(optimizer, model)
        self.names = [u.name for u in units]
        self._params = [u.weight for u in units]
        self.version, self.last_update_step = 1, 0
        self._attach()

    def table(self) -> list[dict]:
        loc = param_locations(self.optimizer)
        return [
            {"name": n, "alpha": None, "weight_decay": float(loc[id(p)][1].get("weight_decay", 0.0))}
            for n, p in zip(self.names, self._params)
        ]


class TypeDecay(PerMatrixController):
    """Fixed decay multipliers per module type, no spectral analysis.

    Each analysed matrix gets ``wd0 × multiplier[type]`` once, at construction: attention matrices
    (q/k/v/o) ``attention`` (0.6666 = AlphaDecay's s1), MLP matrices (gate/up/down) ``mlp`` (3 = s2),
    any other type ×1 (``multipliers`` may override or add types, keyed by the anatomy operator
    (:data:`layerwise.anatomy.OPERATORS`: q/k/v/o/qkv are attention, gate/up/gate_up/down MLP).  Each matrix
    needs a group of its own, as for :class:`~layerwise.decay.AlphaDecay` (``param_groups(...,
    per_matrix=True)``).  ``wd0`` as in AlphaDecay.
    """

    name = "typedecay"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        attention: float = S1,
        mlp: float = S2,
        *,
        wd0: float | str | None = None,
        multipliers: dict[str, float] | None = None,
        select: Select = None,
    ) -> None:
        for field, v in (("attention", attention), ("mlp", mlp)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{field} multiplier must be finite and >= 0, got {v!r}")
        units = layout_units(optimizer, model, self.per_matrix_for(select=select), "TypeDecay")
        super().__init__(optimizer, model)
        mult = {t: float(attention) for t in ATTENTION_OPERATORS}
        mult.update({t: float(mlp) for t in MLP_OPERATORS})
        mult.update({k: float(v) for k, v in (multipliers or {}).items()})
        self.multipliers = mult
        self._adopt(units, wd0)
        an = _anatomy.anatomy(model)
        self.decays = [w * mult.get(an.by_name(n).operator or "", 1.0) for n, w in zip(self.names, self.wd0)]
        self.write_decays(self.units, self.decays)
        self.version, self.last_update_step = 1, 0
        self._attach()

    def table(self) -> list[dict]:
        return [{"name": n, "alpha": None, "weight_decay": wd} for n, wd in zip(self.names, self.decays)]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "names": list(self.names), "weight_decay": list(self.decays)}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("names", [])) != self.names:
            raise ValueError(f"TypeDecay state dict was saved for {state.get('names')!r}, now {self.names!r}")
        super().load_state_dict(state)
        self.decays = [float(v) for v in state["weight_decay"]]
        self.write_decays(self.units, self.decays)


class AWD(DecayController):
    """Adaptive weight decay (Ghiasi, Shafahi, Ardekani, NeurIPS 2023, Algorithm 1), applied to every group
    whose ``weight_decay`` is nonzero at construction.

    At each step, with ‖g‖ and ‖w‖ the global L2 norms of the gradients and weights of all controlled
    parameters (after clipping)::

        λ_t = λ_awd · ‖g_t‖ / ‖w_t‖,     λ̄_t = β · λ̄_{t−1} + (1 − β) · λ_t,   λ̄_0 = 0,  β = 0.1

    and group ``k`` decays with ``λ̄_t · wd_k / wd_ref`` (``wd_k`` its base decay, ``wd_ref`` the largest of
    them — so with one common base decay every group gets λ̄_t, as in the paper; groups with a smaller base,
    e.g. multipliers, keep their ratio).  λ̄_t is written into those groups' ``weight_decay`` in a step
    pre-hook (after clipping and unscaling, before the update), so the optimizer applies it its own way:
    coupled L2 for torch ``Adam``/``SGD`` (the paper adds λ̄·w to SGD's gradient), decoupled for ``AdamW``,
    ``Muon``, AlphaAdam.

    ``lambda_awd``:

    * ``None`` (default) calibrates λ_awd = wd_ref · ‖w_1‖ / ‖g_1‖ on the first step, so the decay starts at
      the configured base decay and then follows ‖g‖/‖w‖ (the paper's λ_awd is tuned per task; ‖g‖/‖w‖ of
      an LLM is ~1e-3, far from CIFAR's scale);
    * ``"authors"``: λ_awd = 100 · wd_ref, what the AlphaDecay authors' script runs (it multiplies the
      configured weight decay by 100 and passes it as λ_awd);
    * a number: that λ_awd.

    The authors' script has all parameters (norms and embeddings too) in one group at wd0, so its AWD decays
    everything; here only groups with a nonzero decay are controlled — build the optimizer with one group to
    reproduce it.  Cost: one host synchronisation per step (λ̄_t, one scalar, read back so that it can be
    written into the groups as the float every torch optimizer takes).  Free on CPU; on a GPU the host waits
    for the backward pass before it can queue the optimizer step, which AdamW alone does not (unmeasured
    here: no GPU figures yet).
    """

    name = "awd"
    interval = 1

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        lambda_awd: float | str | None = None,
        beta: float = 0.1,
    ) -> None:
        if isinstance(lambda_awd, str):
            if lambda_awd != "authors":
                raise ValueError(f"lambda_awd must be None, 'authors' or a number >= 0, got {lambda_awd!r}")
        elif lambda_awd is not None and not (
            isinstance(lambda_awd, (int, float)) and math.isfinite(lambda_awd) and lambda_awd >= 0
        ):
            raise ValueError(f"lambda_awd must be None, 'authors' or a finite number >= 0, got {lambda_awd!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        super().__init__(optimizer, model)
        self.lambda_awd = lambda_awd
        self.beta = float(beta)
        by_id = {id(p): n for n, p in _names.named_parameters(model, trainable_only=False)}
        groups = [g for g in optimizer.param_groups if g["params"] and base_decay(g) != 0.0]
        if not groups:
            raise ValueError("AWD: no parameter group has a nonzero weight_decay to adapt")
        self._base = [base_decay(g) for g in groups]
        self.wd_ref = max(self._base)
        self.group_names = [_group_names(g, by_id) for g in groups]  # the controlled groups' tensors
        self.names = [n for names in self.group_names for n in names]
        self._param_lists = [list(g["params"]) for g in groups]
        self._first = [ps[0] for ps in self._param_lists]  # one member identifies each group
        self.record_base(self._first)
        self.lam_bar: float | None = None  # λ̄_t
        if lambda_awd == "authors":
            lambda_awd = AUTHORS_AWD_FACTOR * self.wd_ref
        self.calib: float | None = None if lambda_awd is None else float(lambda_awd)
        self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
        self._attach()

    @torch.no_grad()
    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        ps = [p for ps in self._param_lists for p in ps if p.grad is not None]
        if not ps:
            return
        dev = ps[0].device
        grads = [p.grad for p in ps if p.grad is not None]  # all of them (ps holds the tensors with one)
        norms = global_norms(grads + ps, dev)  # whole-tensor norms under FSDP2 too, one collective
        gn = torch.linalg.vector_norm(norms[: len(grads)])
        wn = torch.linalg.vector_norm(norms[len(grads) :])
        tiny = torch.finfo(torch.float32).tiny
        ratio = max(float(gn / wn.clamp_min(tiny)), tiny)  # the one host synchronisation of the step
        if self.calib is None:
            self.calib = self.wd_ref / ratio
        prev = 0.0 if self.lam_bar is None else self.lam_bar
        self.lam_bar = self.beta * prev + (1.0 - self.beta) * self.calib * ratio
        self._write()

    def _write(self) -> None:
        """``weight_decay = λ̄ · base / wd_ref`` in every controlled group."""
        for g, base in zip(self.current_groups(self._first), self._base):
            g["weight_decay"] = self.current() * base / self.wd_ref

    def after_step(self) -> None:
        self.version += 1
        self.last_update_step = self.step

    def current(self) -> float:
        """λ̄ of the last step (0 before the first step)."""
        return 0.0 if self.lam_bar is None else self.lam_bar

    def table(self) -> list[dict]:
        lam = self.current()
        return [
            {"name": n, "alpha": None, "weight_decay": lam * base / self.wd_ref}
            for names, base in zip(self.group_names, self._base)
            for n in names
        ]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "base_weight_decay": list(self._base),
            "lam_bar": self.lam_bar,
            "calib": self.calib,
        }

    def load_state_dict(self, state: dict) -> None:
        if [float(b) for b in state.get("base_weight_decay", [])] != self._base:
            raise ValueError(
                f"AWD state dict has base decays {state.get('base_weight_decay')!r}, controller has {self._base!r}"
            )
        super().load_state_dict(state)
        self.lam_bar = None if state["lam_bar"] is None else float(state["lam_bar"])
        self.calib = None if state["calib"] is None else float(state["calib"])
        if self.lam_bar is not None:
            self._write()


class AdaDecay(PerMatrixController):
    """AdaDecay (Nakamura & Hong, 2019) at module level; the defaults are the AlphaDecay authors' baseline.

    The original scales each parameter's decay by a sigmoid of its gradient norm normalised within its
    layer (larger gradient → more decay).  At module level, for each analysed matrix ``m`` in transformer
    block ``b`` (matrices outside blocks form one extra block)::

        r_m = ‖g_m‖                (norm="raw", default)    or   ‖g_m‖ / √numel_m   (norm="rms")
        z_m = (r_m − mean_b r) / (std_b r + eps)      (population std over the block's matrices)
        λ_m = wd0_m · 2 · sigmoid(slope · z_m)        (∈ (0, 2·wd0); a block of one matrix gives wd0)

    λ is recomputed right before every ``interval``-th optimizer step, from that step's gradients (after
    clipping), and held in between; before the first recomputation every matrix has ``wd0``.  Defaults
    (``norm="raw"``, ``slope=4``, ``interval=500``, ``eps=1e-8``) are what the AlphaDecay authors ran as this
    baseline; ``norm="rms", slope=1, interval=1`` is the per-step variant layerwise used before (RMS gradient,
    so that matrix size does not dominate the z-score — with the raw norm, the larger MLP matrices of a
    block read the larger gradient norms and get the larger decays).

    ``modules="authors"`` analyses the authors' module set (every ``nn.Linear`` but the first and the last,
    :func:`layerwise.decay.alphadecay.authors_modules`), gives an analysed module's bias its module's λ,
    and sets every other parameter group to ``wd0`` (their "untuned" group); ``"blocks"`` (default) analyses
    the block matrices (or ``select``) and leaves the other parameters as they are.

    Each analysed matrix needs a group of its own, as for :class:`~layerwise.decay.AlphaDecay`
    (``param_groups(..., per_matrix=True)``, or ``per_matrix="authors"`` for ``modules="authors"``).  λ_m is
    written into the groups' ``weight_decay`` by the step pre-hook of a recomputation step, so the optimizer
    applies it (coupled or decoupled, as it does); one host synchronisation per recomputation.
    """

    name = "adadecay"
    interval: int

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        norm: str = "raw",
        slope: float = 4.0,
        interval: int = 500,
        wd0: float | str | None = None,
        eps: float = 1e-8,
        select: Select = None,
        modules: str = "blocks",
    ) -> None:
        if not (math.isfinite(slope) and slope >= 0):
            raise ValueError(f"slope must be finite and >= 0, got {slope!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if modules not in ("blocks", "authors"):
            raise ValueError(f"modules must be 'blocks' or 'authors', got {modules!r}")
        if modules == "authors" and select is not None:
            raise ValueError("select applies to modules='blocks'; modules='authors' fixes the module set")
        units = layout_units(optimizer, model, self.per_matrix_for(modules=modules, select=select), "AdaDecay")
        if not units:
            raise ValueError("modules='authors': no trainable nn.Linear between the first and the last")
        super().__init__(optimizer, model)
        self.slope, self.eps, self.norm, self.modules = float(slope), float(eps), norm, modules
        self.interval = interval
        self._adopt(
            units,
            wd0,
            one_base="modules='authors' sets every other parameter to one base decay" if modules == "authors" else None,
        )
        blocks: dict[Any, int] = {}
        an = _anatomy.anatomy(model)
        self._block = [blocks.setdefault((an.by_name(n).stack, an.by_name(n).block), len(blocks)) for n in self.names]
        self._nblocks = len(blocks)
        dev = self._params[0].device
        self._block_t = torch.tensor(self._block, device=dev)
        self._base_t = torch.tensor(self.wd0, dtype=torch.float32, device=dev)
        self._scale = torch.tensor(
            [math.sqrt(p.numel()) if norm == "rms" else 1.0 for p in self._params], dtype=torch.float32, device=dev
        )
        self.lam: list[float] | None = None  # λ_m of the last recomputation (None: wd0 so far)
        self._apply()
        self.version, self.last_update_step = 1, 0
        self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
        self._attach()

    def _apply(self) -> None:
        self.write_decays(self.units, self.wd0 if self.lam is None else self.lam)
        if self.modules == "authors":
            self.write_untuned(self.units, self.wd0[0])

    def decays_from_grad_norms(self, gnorm: torch.Tensor) -> torch.Tensor:
        """λ per analysed matrix from its gradient L2 norm (float32 tensor, same order as ``names``)."""
        dev = gnorm.device
        idx, nb = self._block_t.to(dev), self._nblocks
        r = gnorm.float() / self._scale.to(dev)
        count = torch.zeros(nb, device=dev).index_add_(0, idx, torch.ones_like(r))
        mean = torch.zeros(nb, device=dev).index_add_(0, idx, r) / count
        var = torch.zeros(nb, device=dev).index_add_(0, idx, (r - mean[idx]) ** 2) / count
        z = (r - mean[idx]) / (var.sqrt()[idx] + self.eps)
        return self._base_t.to(dev) * 2.0 * torch.sigmoid(self.slope * z)

    @torch.no_grad()
    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if (self.step + 1) % self.interval != 0 or all(p.grad is None for p in self._params):
            return
        dev = self._params[0].device
        # a matrix without gradient reads as zero gradient in the statistics (and is not decayed: torch skips it)
        have = [i for i, p in enumerate(self._params) if p.grad is not None]
        grads = [g for g in (p.grad for p in self._params) if g is not None]
        gnorm = torch.zeros(len(self._params), dtype=torch.float32, device=dev)
        gnorm[have] = global_norms(grads, dev)  # whole-tensor norms under FSDP2 too
        self.lam = self.decays_from_grad_norms(gnorm).tolist()  # one host synchronisation per recomputation
        self._apply()
        self.version += 1
        self.last_update_step = self.step

    def table(self) -> list[dict]:
        lam = self.wd0 if self.lam is None else self.lam
        return [{"name": n, "alpha": None, "weight_decay": float(v)} for n, v in zip(self.names, lam)]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "names": list(self.names), "lam": None if self.lam is None else list(self.lam)}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("names", [])) != self.names:
            raise ValueError(f"AdaDecay state dict was saved for {state.get('names')!r}, now {self.names!r}")
        super().load_state_dict(state)
        lam = state.get("lam")
        self.lam = None if lam is None else [float(v) for v in lam]
        self._apply()
