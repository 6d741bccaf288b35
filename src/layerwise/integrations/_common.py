"""Framework-independent pieces shared by the Hugging Face and Lightning integrations.

:func:`build_optimizer` builds a layerwise optimizer for a model: :func:`layerwise.param_groups` (canonical
names, width scaling, a multiplier group, no decay on norms/biases) fed to AlphaAdam, CautiousAdamW, torch
AdamW or torch Adam, and — by default — each matrix that AlphaDecay analyses moved to a parameter group of
its own *at construction*.  That last step is what lets a weight-decay controller be attached later, after a
framework has already created its LR scheduler (schedulers record one base LR per group, so groups cannot be
split once one exists; see :func:`layerwise.decay.split_groups`).

Weight decay is PyTorch's coupled convention: one step does ``θ ← θ·(1 − lr·λ)`` (decoupled optimizers) or
adds ``λ·θ`` to the gradient (torch ``Adam``).

This module imports neither ``transformers`` nor ``lightning``, and never ``layerwise.lab``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerwise.optim import registry as _registry

__all__ = ["OPTIMIZERS", "build_optimizer", "check_optimizer_options", "unwrap_optimizer", "decay_log_items"]

#: optimizer names accepted by :func:`build_optimizer` (the registry :mod:`layerwise.optim.registry`)
OPTIMIZERS = tuple(_registry.OPTIMIZERS)


def check_optimizer_options(name: str, lr: float, weight_decay: float, betas: Sequence[float], eps: float) -> None:
    """Eager validation of the arguments of :func:`build_optimizer` (``ValueError`` naming the field)."""
    _registry.canonical_name(name)  # ValueError naming the choices
    for field, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{field} must be a non-negative finite number, got {value!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")


def build_optimizer(
    model: nn.Module,
    name: str = "alphaadam",
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    *,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    scaling: Any = None,
    multiplier_weight_decay: float = 2e-3,
    multiplier_lr_scale: float = 1.0,
    no_decay: Sequence[str] = ("norm", "bias", "multiplier"),
    split_matrices: bool = True,
    decay_select: Any = None,
    **optimizer_options: Any,
) -> torch.optim.Optimizer:
    """A layerwise optimizer for ``model``, ready for a weight-decay controller attached later.

    Args:
        model: the model to optimise (its trainable parameters; canonical names).  Add multipliers
            (:func:`layerwise.add_multipliers`) *before* calling this.
        name: a name of the optimizer registry (:data:`layerwise.optim.registry.OPTIMIZERS`): ``"alphaadam"``
            (:class:`layerwise.AlphaAdam`), ``"cautious"`` (:class:`layerwise.CautiousAdamW`), ``"adamw"``
            (``torch.optim.AdamW``), ``"adam"`` (``torch.optim.Adam``, coupled L2 — the AlphaDecay paper's main
            table) or ``"muon"`` (:class:`layerwise.optim.MuonAdamW`).
        lr, weight_decay: base learning rate and weight decay λ (PyTorch's coupled convention
            ``θ ← θ·(1 − lr·λ)``); groups scale them (width scaling, multipliers, no-decay tokens).
        betas, eps: Adam hyper-parameters.
        scaling: a :class:`layerwise.WidthScaling` or ``None``.
        multiplier_weight_decay, multiplier_lr_scale, no_decay: as in :func:`layerwise.param_groups`.
        split_matrices: give every matrix that :class:`layerwise.AlphaDecay` analyses (``decay_select``; default
            the block matrices of :func:`layerwise.anatomy`) its own parameter group now, so a decay
            controller can be attached after the LR scheduler exists.  Costs one group per matrix (a few more
            kernel launches per step for ``foreach`` optimizers); ``False`` keeps the merged groups.
        decay_select: which matrices to split (same meaning as ``AlphaDecay(select=...)``); must match the
            ``select`` the decay callback uses.
        **optimizer_options: passed to the optimizer class (``mask_ref``, ``alpha_mode``, ``alpha_max``,
            ``floor``, ``masking``, ``fast`` for AlphaAdam; ``fused``/``foreach`` for torch's).

    Returns:
        The optimizer.  Every group carries ``params``, ``lr``, ``weight_decay``, ``param_names`` (canonical
        names) and ``group`` (a label); torch optimizers accept the extra keys.
    """
    from layerwise.decay._base import controlled_matrices, split_groups
    from layerwise.optim.groups import param_groups

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_optimizer_options(name, lr, weight_decay, betas, eps)
    groups = param_groups(
        model,
        lr=lr,
        weight_decay=weight_decay,
        scaling=scaling,
        multiplier_weight_decay=multiplier_weight_decay,
        multiplier_lr_scale=multiplier_lr_scale,
        no_decay=no_decay,
    )
    opt = _registry.build(
        name, groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **optimizer_options
    )
    if split_matrices:
        split_groups(opt, [p for _, p in controlled_matrices(model, decay_select)])
    return opt


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of a wrapper chain (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer`` ...): step hooks must be registered on the optimizer whose ``step``
    actually runs."""
    seen = 0
    while seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
        seen += 1
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "register_step_post_hook")):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


def decay_log_items(table: list[dict], prefix: str = "alphadecay", per_module: bool = True) -> dict[str, float]:
    """Flatten a controller's ``table()`` into scalar log entries.

    Keys: ``{prefix}/alpha_mean|alpha_min|alpha_max`` (over finite α), ``{prefix}/weight_decay_mean|_min|_max``
    and, with ``per_module``, ``{prefix}/alpha/{name}`` and ``{prefix}/weight_decay/{name}`` per analysed
    matrix (``alpha`` is NaN where the estimate was not finite).
    """
    out: dict[str, float] = {}
    alphas = [r["alpha"] for r in table if r.get("alpha") is not None]
    decays = [float(r["weight_decay"]) for r in table]
    if alphas:
        out[f"{prefix}/alpha_mean"] = sum(alphas) / len(alphas)
        out[f"{prefix}/alpha_min"] = min(alphas)
        out[f"{prefix}/alpha_max"] = max(alphas)
    if decays:
        out[f"{prefix}/weight_decay_mean"] = sum(decays) / len(decays)
        out[f"{prefix}/weight_decay_min"] = min(decays)
        out[f"{prefix}/weight_decay_max"] = max(decays)
    if per_module:
        for r in table:
            a = r.get("alpha")
            out[f"{prefix}/alpha/{r['name']}"] = float("nan") if a is None else float(a)
            out[f"{prefix}/weight_decay/{r['name']}"] = float(r["weight_decay"])
    return out
