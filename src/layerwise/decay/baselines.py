"""Baselines for AlphaDecay, with the same interface (``(optimizer, model, ...)``, ``table()``, ``state_dict()``).

* :class:`UniformDecay` — no-op: every group keeps its decay (the usual AdamW run).
* :class:`TypeDecay` — fixed multipliers per module type (attention ×0.6666, MLP ×3), no spectra: the
  cheap ablation that tells whether AlphaDecay's spectra matter beyond the attention/MLP split.
* :class:`AWD` — adaptive weight decay, Ghiasi et al. (NeurIPS 2023), Algorithm 1.
* :class:`AdaDecay` — Nakamura & Hong (2019) at module level; defaults as the AlphaDecay authors ran it.

Formulas, defaults and the differences from the AlphaDecay authors' baselines: ``docs/methods.md`` §1.

Weight decay is PyTorch's convention (coupled lr·λ): a decoupled step does θ ← θ·(1 − lr·λ), a coupled
(L2) step adds λ·θ to the gradient.  ``UniformDecay`` and ``TypeDecay`` only write ``group["weight_decay"]``
(group splitting as in :class:`~layerwise.decay.AlphaDecay`).  ``AWD`` and ``AdaDecay`` change the decay at
every step from gradient norms; writing a Python float into the groups would cost a host sync per step,
so they set the controlled groups' ``weight_decay`` to 0 and apply the decay themselves in a step
*pre*-hook (after gradient clipping and unscaling, before the optimizer's update) with tensor-valued λ:
``mode="decoupled"``: θ ← θ·(1 − lr·λ), exactly what torch ``AdamW``/``Muon`` do before their update;
``mode="coupled"``: g ← g + λ·θ, exactly torch ``Adam``/``SGD``'s L2.  ``mode="auto"`` (default) reads
each group's ``decoupled_weight_decay`` flag (torch ``Adam``/``AdamW``), treats ``SGD``/``RMSprop``/
``Adagrad``/``Adamax``/``NAdam``/``RAdam`` without that flag as coupled, and everything else (``Muon``,
AlphaAdam, ...) as decoupled.  ``lr`` is read from ``group["lr"]`` at the step (after the scheduler).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise import names as _names
from layerwise.decay._base import (
    DecayController,
    Select,
    check_in_optimizer,
    controlled_matrices,
    param_locations,
    resolve_wd0,
    split_groups,
)

__all__ = ["UniformDecay", "TypeDecay", "AWD", "AdaDecay"]

_MODES = ("auto", "coupled", "decoupled")
#: the AlphaDecay authors' AWD runs use λ_awd = 100 · wd0
AUTHORS_AWD_FACTOR = 100.0
_NORMS = ("raw", "rms")
_COUPLED_OPTIMIZERS = ("SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "ASGD", "Adadelta")


def _group_mode(optimizer: Any, group: dict, mode: str) -> str:
    if mode != "auto":
        return mode
    if "decoupled_weight_decay" in group:
        return "decoupled" if group["decoupled_weight_decay"] else "coupled"
    if type(optimizer).__name__ in _COUPLED_OPTIMIZERS and type(optimizer).__module__.startswith("torch.optim"):
        return "coupled"
    return "decoupled"


#: anatomy operators TypeDecay treats as attention / MLP matrices
ATTENTION_OPERATORS = ("q", "k", "v", "o", "qkv")
MLP_OPERATORS = ("gate", "up", "gate_up", "down")


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _name_map(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in _names.named_parameters(model, trainable_only=False)}


def _group_names(group: dict, by_id: dict[int, str]) -> list[str]:
    if "param_names" in group:
        return [_names.canonical_name(n) for n in group["param_names"]]
    return [by_id.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in group["params"]]


@torch.no_grad()
def _apply_decay(p: torch.Tensor, lam: torch.Tensor, lr: Any, mode: str) -> None:
    """One decay of parameter ``p`` by tensor ``lam`` (no host sync)."""
    if mode == "coupled":
        p.grad.add_(p * lam.to(p.dtype))
    else:
        p.mul_(1.0 - lr * lam.to(p.dtype))


class UniformDecay(DecayController):
    """No-op baseline: every group keeps its weight decay.  ``table()`` lists the analysed matrices'
    current decays (``alpha`` is ``None``) so runs log the same columns as AlphaDecay."""

    name = "uniform"

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, select: Select = None) -> None:
        matrices = controlled_matrices(model, select)
        check_in_optimizer(optimizer, matrices)
        super().__init__(optimizer, model)
        self.names = [n for n, _ in matrices]
        self._params = [p for _, p in matrices]
        self.version, self.last_update_step = 1, 0
        self._attach()

    def table(self) -> list[dict]:
        loc = param_locations(self.optimizer)
        return [
            {"name": n, "alpha": None, "weight_decay": float(loc[id(p)][1].get("weight_decay", 0.0))}
            for n, p in zip(self.names, self._params)
        ]


class TypeDecay(DecayController):
    """Fixed decay multipliers per module type, no spectral analysis.

    Each analysed matrix gets ``wd0 × multiplier[type]`` once, at construction: attention matrices
    (q/k/v/o) ``attention`` (0.6666 = AlphaDecay's s1), MLP matrices (gate/up/down) ``mlp`` (3 = s2),
    any other type ×1 (``multipliers`` may override or add types, keyed by the anatomy operator
    (:data:`layerwise.anatomy.OPERATORS`: q/k/v/o/qkv are attention, gate/up/gate_up/down MLP).  Groups are split as in :class:`~layerwise.decay.AlphaDecay`
    (create it before the LR scheduler).  ``wd0`` as in AlphaDecay.
    """

    name = "typedecay"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        attention: float = 0.6666,
        mlp: float = 3.0,
        *,
        wd0: float | str | None = None,
        multipliers: dict[str, float] | None = None,
        select: Select = None,
    ) -> None:
        for field, v in (("attention", attention), ("mlp", mlp)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{field} multiplier must be finite and >= 0, got {v!r}")
        matrices = controlled_matrices(model, select)
        check_in_optimizer(optimizer, matrices)
        super().__init__(optimizer, model)
        mult = {t: float(attention) for t in ATTENTION_OPERATORS}
        mult.update({t: float(mlp) for t in MLP_OPERATORS})
        mult.update({k: float(v) for k, v in (multipliers or {}).items()})
        self.multipliers = mult
        self.names = [n for n, _ in matrices]
        self._params = [p for _, p in matrices]
        groups = split_groups(optimizer, self._params)
        self.wd0 = resolve_wd0(groups, wd0, self.names)
        an = _anatomy.anatomy(model)
        self.decays = [w * mult.get(an.by_name(n).operator or "", 1.0) for n, w in zip(self.names, self.wd0)]
        self._apply()
        self.version, self.last_update_step = 1, 0
        self._attach()

    def _apply(self) -> None:
        for g, wd in zip(self.current_groups(self._params), self.decays):
            g["weight_decay"] = wd

    def table(self) -> list[dict]:
        return [{"name": n, "alpha": None, "weight_decay": wd} for n, wd in zip(self.names, self.decays)]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "names": list(self.names), "weight_decay": list(self.decays)}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("names", [])) != self.names:
            raise ValueError(f"TypeDecay state dict was saved for {state.get('names')!r}, now {self.names!r}")
        super().load_state_dict(state)
        self.decays = [float(v) for v in state["weight_decay"]]
        self._apply()


class _PerStepDecay(DecayController):
    """Controllers that set λ from gradients at every step and apply the decay themselves (pre-hook)."""

    interval = 1

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, mode: str) -> None:
        _check_mode(mode)
        super().__init__(optimizer, model)
        self.mode = mode
        self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))

    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.before_step()

    def before_step(self) -> None:  # pragma: no cover - overridden
        pass

    def after_step(self) -> None:
        self.version += 1
        self.last_update_step = self.step


class AWD(_PerStepDecay):
    """Adaptive weight decay (Ghiasi, Shafahi, Ardekani, NeurIPS 2023, Algorithm 1), applied to every group
    whose ``weight_decay`` is nonzero at construction.

    At each step, with ‖g‖ and ‖w‖ the global L2 norms of the gradients and weights of all controlled
    parameters (after clipping)::

        λ_t = λ_awd · ‖g_t‖ / ‖w_t‖,     λ̄_t = β · λ̄_{t−1} + (1 − β) · λ_t,   λ̄_0 = 0,  β = 0.1

    and group ``k`` decays with ``λ̄_t · wd_k / wd_ref`` (``wd_k`` its decay at construction, ``wd_ref`` the
    largest of them — so with one common base decay every group gets λ̄_t, as in the paper; groups with a
    smaller base, e.g. multipliers, keep their ratio).  The paper adds λ̄·w to the gradient of SGD
    (coupled); here ``mode`` picks coupled/decoupled (default from the optimizer, see module docs).

    ``lambda_awd``:

    * ``None`` (default) calibrates λ_awd = wd_ref · ‖w_1‖ / ‖g_1‖ on the first step, so the decay starts at
      the configured base decay and then follows ‖g‖/‖w‖ (the paper's λ_awd is tuned per task; ‖g‖/‖w‖ of
      an LLM is ~1e-3, far from CIFAR's scale);
    * ``"authors"``: λ_awd = 100 · wd_ref, what the AlphaDecay authors' script runs (it multiplies the
      configured weight decay by 100 and passes it as λ_awd);
    * a number: that λ_awd.

    The authors' script has all parameters (norms and embeddings too) in one group at wd0, so its AWD decays
    everything; here only groups with a nonzero decay are controlled — build the optimizer with one group to
    reproduce it.  No host sync per step.
    """

    name = "awd"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        lambda_awd: float | str | None = None,
        beta: float = 0.1,
        *,
        mode: str = "auto",
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
        super().__init__(optimizer, model, mode)
        self.lambda_awd = lambda_awd
        self.beta = float(beta)
        by_id = _name_map(model)
        groups = [g for g in optimizer.param_groups if float(g.get("weight_decay", 0.0)) != 0.0]
        if not groups:
            raise ValueError("AWD: no parameter group has a nonzero weight_decay to adapt")
        self._base = [float(g["weight_decay"]) for g in groups]
        self.wd_ref = max(self._base)
        self._modes = [_group_mode(optimizer, g, mode) for g in groups]
        self.names = [_group_names(g, by_id) for g in groups]
        self._param_lists = [list(g["params"]) for g in groups]
        self._first = [ps[0] for ps in self._param_lists]  # one member identifies each group
        for g in groups:
            g["weight_decay"] = 0.0
        self.lam_bar: torch.Tensor | None = None  # λ̄_t (0-dim tensor on the parameters' device)
        if lambda_awd == "authors":
            lambda_awd = AUTHORS_AWD_FACTOR * self.wd_ref
        self.calib: torch.Tensor | None = None if lambda_awd is None else torch.tensor(float(lambda_awd))
        self._attach()

    @torch.no_grad()
    def before_step(self) -> None:
        ps = [p for ps in self._param_lists for p in ps if p.grad is not None]
        if not ps:
            return
        dev = ps[0].device
        gn = torch.linalg.vector_norm(
            torch.stack([n.to(dev, torch.float32) for n in torch._foreach_norm([p.grad for p in ps])])
        )
        wn = torch.linalg.vector_norm(torch.stack([n.to(dev, torch.float32) for n in torch._foreach_norm(ps)]))
        ratio = gn / wn.clamp_min(torch.finfo(torch.float32).tiny)
        if self.calib is None:
            self.calib = self.wd_ref / ratio.clamp_min(torch.finfo(torch.float32).tiny)
        lam = self.calib.to(dev) * ratio
        prev = torch.zeros((), device=dev) if self.lam_bar is None else self.lam_bar.to(dev)
        self.lam_bar = self.beta * prev + (1.0 - self.beta) * lam
        groups = self.current_groups(self._first)
        for g, plist, base, mode in zip(groups, self._param_lists, self._base, self._modes):
            lam_g = self.lam_bar * (base / self.wd_ref)
            for p in plist:
                if p.grad is not None:
                    _apply_decay(p, lam_g, g["lr"], mode)

    def current(self) -> float:
        """λ̄ of the last step (0 before the first step); one host sync."""
        return 0.0 if self.lam_bar is None else float(self.lam_bar)

    def table(self) -> list[dict]:
        lam = self.current()
        return [
            {"name": n, "alpha": None, "weight_decay": lam * base / self.wd_ref}
            for names, base in zip(self.names, self._base)
            for n in names
        ]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "base_weight_decay": list(self._base),
            "lam_bar": None if self.lam_bar is None else float(self.lam_bar),
            "calib": None if self.calib is None else float(self.calib),
        }

    def load_state_dict(self, state: dict) -> None:
        if [float(b) for b in state.get("base_weight_decay", [])] != self._base:
            raise ValueError(
                f"AWD state dict has base decays {state.get('base_weight_decay')!r}, controller has {self._base!r}"
            )
        super().load_state_dict(state)
        dev = self._first[0].device
        self.lam_bar = None if state["lam_bar"] is None else torch.tensor(state["lam_bar"], device=dev)
        self.calib = None if state["calib"] is None else torch.tensor(state["calib"], device=dev)


class AdaDecay(_PerStepDecay):
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

    Groups are split per analysed tensor (as in AlphaDecay; create it before the LR scheduler); their
    ``weight_decay`` is set to 0 and λ_m is applied in the step pre-hook (see module docs for ``mode``).
    No host sync per step.
    """

    name = "adadecay"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        slope: float = 4.0,
        *,
        interval: int = 500,
        norm: str = "raw",
        wd0: float | str | None = None,
        mode: str = "auto",
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
        if modules == "authors":
            if select is not None:
                raise ValueError("select applies to modules='blocks'; modules='authors' fixes the module set")
            from layerwise.decay.alphadecay import authors_modules

            by_id = {id(p): n for n, p in _names.named_parameters(model)}
            matrices, biases = [], []
            for _, mod in authors_modules(model):
                if id(mod.weight) in by_id and mod.weight.dim() == 2:
                    matrices.append((by_id[id(mod.weight)], mod.weight))
                    b = getattr(mod, "bias", None)
                    biases.append(b if isinstance(b, torch.Tensor) and id(b) in by_id else None)
            if not matrices:
                raise ValueError("modules='authors': no trainable nn.Linear between the first and the last")
        else:
            matrices = controlled_matrices(model, select)
            biases = [None] * len(matrices)
        check_in_optimizer(optimizer, matrices)
        check_in_optimizer(optimizer, [(f"bias of {n}", b) for (n, _), b in zip(matrices, biases) if b is not None])
        _check_mode(mode)
        super().__init__(optimizer, model, mode)
        self.slope, self.eps, self.norm, self.modules = float(slope), float(eps), norm, modules
        self.interval = interval
        self.names = [n for n, _ in matrices]
        self._params = [p for _, p in matrices]
        self._biases = biases
        self._owner = [i for i, b in enumerate(biases) if b is not None]  # matrix index of each bias
        bias_list = [biases[i] for i in self._owner]
        split_groups(optimizer, self._params + bias_list)
        groups = self.current_groups(self._params)
        self.wd0 = resolve_wd0(groups, wd0, self.names)
        self._modes = [_group_mode(optimizer, g, mode) for g in groups]
        self._bias_modes = [_group_mode(optimizer, g, mode) for g in self.current_groups(bias_list)]
        mine = {id(p) for p in self._params + bias_list}
        if modules == "authors":
            if len(set(self.wd0)) != 1:
                raise ValueError(
                    f"modules='authors' sets every other parameter to one base decay, but the analysed modules have "
                    f"several ({sorted(set(self.wd0))}); pass a number as wd0"
                )
            for g in optimizer.param_groups:
                if not any(id(p) in mine for p in g["params"]):
                    g["weight_decay"] = self.wd0[0]
        for g in self.current_groups(self._params + bias_list):
            g["weight_decay"] = 0.0
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
        self.lam: torch.Tensor | None = None  # λ_m of the last recomputation (None: wd0 so far)
        self.version, self.last_update_step = 1, 0
        self._attach()

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
    def before_step(self) -> None:
        present = [p.grad is not None for p in self._params]
        if not any(present):
            return
        dev = self._params[0].device
        if (self.step + 1) % self.interval == 0:
            grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in self._params]
            gnorm = torch.stack([n.to(dev, torch.float32) for n in torch._foreach_norm(grads)])
            # a matrix without gradient reads as zero gradient in the statistics (and is not decayed: torch skips it)
            self.lam = self.decays_from_grad_norms(gnorm)
            self.version += 1
            self.last_update_step = self.step
        lam = self.lam if self.lam is not None else self._base_t.to(dev)
        for i, (p, g, mode) in enumerate(zip(self._params, self.current_groups(self._params), self._modes)):
            if present[i]:
                _apply_decay(p, lam[i], g["lr"], mode)
        bias_list = [self._biases[i] for i in self._owner]
        for i, b, g, mode in zip(self._owner, bias_list, self.current_groups(bias_list), self._bias_modes):
            if b.grad is not None:
                _apply_decay(b, lam[i], g["lr"], mode)

    def after_step(self) -> None:
        pass  # version / last_update_step move when λ is recomputed (before_step)

    def table(self) -> list[dict]:
        lam = self.wd0 if self.lam is None else self.lam.tolist()
        return [{"name": n, "alpha": None, "weight_decay": float(v)} for n, v in zip(self.names, lam)]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "names": list(self.names),
            "lam": None if self.lam is None else self.lam.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("names", [])) != self.names:
            raise ValueError(f"AdaDecay state dict was saved for {state.get('names')!r}, now {self.names!r}")
        super().load_state_dict(state)
        lam = state.get("lam")
        self.lam = None if lam is None else torch.tensor(lam, dtype=torch.float32, device=self._params[0].device)
