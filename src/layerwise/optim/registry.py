"""The optimizer registry: the one table of optimizer names that the library, the lab (``optim.name`` in a
training config) and the Hugging Face / Lightning integrations accept.

Each entry knows its class and how the common hyper-parameters ``(lr, betas, eps, weight_decay)`` map to its
constructor, so callers write one call whatever the optimizer::

    opt = build("alphaadam", param_groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, floor=0.1)

Weight decay is PyTorch's coupled convention: one decoupled step does ``θ ← θ·(1 − lr·λ)``; torch ``Adam`` adds
``λ·θ`` to the gradient instead (coupled L2, the AlphaDecay paper's main table).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OptimizerEntry", "OPTIMIZERS", "ALIASES", "canonical_name", "optimizer_class", "build"]


def _adam_like(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict[str, Any]:
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _muon(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict[str, Any]:
    # Muon on the block matrices at ``lr``; its AdamW half takes the same lr, betas and eps
    return dict(lr=lr, weight_decay=weight_decay, adam_lr=lr, adam_betas=tuple(betas), adam_eps=eps)


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer: ``target`` is ``"module:Class"`` (imported on first use)."""

    name: str
    target: str
    summary: str
    common: Callable[[float, tuple[float, float], float, float], dict[str, Any]] = _adam_like

    def cls(self) -> type[torch.optim.Optimizer]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


#: name -> entry, in the order they are documented
OPTIMIZERS: dict[str, OptimizerEntry] = {
    e.name: e
    for e in (
        OptimizerEntry("adamw", "torch.optim:AdamW", "torch.optim.AdamW (decoupled decay)"),
        OptimizerEntry("adam", "torch.optim:Adam", "torch.optim.Adam (coupled L2 decay)"),
        OptimizerEntry(
            "alphaadam", "layerwise.optim.alphaadam:AlphaAdam", "AlphaAdam (masked AdamW, per-tensor alpha)"
        ),
        OptimizerEntry("cautious", "layerwise.optim.alphaadam:CautiousAdamW", "CautiousAdamW (C-Optim / timm rule)"),
        OptimizerEntry("muon", "layerwise.optim.muon:MuonAdamW", "Muon on block matrices, AdamW on the rest", _muon),
    )
}

#: older spellings still accepted (configs written before the registry was unified)
ALIASES: dict[str, str] = {"cautious_adamw": "cautious"}


def canonical_name(name: str, field: str = "optimizer name") -> str:
    """``name`` (or its alias) as a registry key; ``ValueError`` naming ``field`` and the choices otherwise."""
    if isinstance(name, str):
        name = ALIASES.get(name, name)
        if name in OPTIMIZERS:
            return name
    raise ValueError(f"{field}: unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class registered as ``name``."""
    return OPTIMIZERS[canonical_name(name)].cls()


def build(
    name: str,
    params: Any,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    **options: Any,
) -> torch.optim.Optimizer:
    """The optimizer registered as ``name`` over ``params`` (parameters or groups).  ``options`` go to the
    constructor as they are and override the mapped common hyper-parameters (e.g. ``adam_lr`` for Muon);
    ``TypeError`` names the options the optimizer rejected."""
    entry = OPTIMIZERS[canonical_name(name)]
    cls = entry.cls()
    kwargs = {**entry.common(lr, betas, eps, weight_decay), **options}
    try:
        return cls(params, **kwargs)
    except TypeError as e:
        raise TypeError(
            f"optimizer {entry.name!r} ({cls.__name__}) rejected the options {sorted(options)}: {e}"
        ) from None
