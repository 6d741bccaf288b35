"""Weight-decay controllers: AlphaDecay and its baselines.

Every controller is built as ``Controller(optimizer, model, ...)`` after the optimizer and **before the LR
scheduler** (controllers that set per-module decays give each analysed matrix its own parameter group),
counts optimizer steps itself with a step post-hook, and offers:

* ``table()`` — one row per controlled parameter: ``{"name", "alpha", "weight_decay", ...}``
  (canonical names; ``alpha`` is ``None`` for controllers that compute none);
* ``version`` (how many times the decays were set; log ``table()`` when it changes), ``last_update_step``,
  ``interval`` (``None``: fixed after construction; ``1``: changes every step; ``k``: every k steps);
* ``state_dict()`` / ``load_state_dict()`` (load after building the controller; resume == uninterrupted);
* ``remove()`` — detach the hooks.

Weight decay is PyTorch's convention (coupled lr·λ): θ ← θ·(1 − lr·λ) per decoupled step, or λ·θ added
to the gradient for coupled L2 (torch ``Adam``).

==============  =========================  ==========================================================
name            class                      what it does
==============  =========================  ==========================================================
``uniform``     :class:`UniformDecay`      nothing (baseline)
``alphadecay``  :class:`AlphaDecay`        λ from the spectral heavy-tail exponent α, every 500 steps
``typedecay``   :class:`TypeDecay`         fixed multipliers: attention ×0.6666, MLP ×3
``awd``         :class:`AWD`               λ ∝ ‖g‖/‖w‖ with an EMA (Ghiasi et al. 2023), every step
``adadecay``    :class:`AdaDecay`          2σ(4z) of each matrix's gradient-norm z-score in its block, every 500
==============  =========================  ==========================================================
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from layerwise.decay._base import DecayController, controlled_matrices, split_groups
from layerwise.decay.alphadecay import METRICS, MODULE_SETS, AlphaDecay, authors_modules, estimate_alphas, metric_scores
from layerwise.decay.baselines import AWD, AdaDecay, TypeDecay, UniformDecay
from layerwise.decay.mapping import ASSIGNS, assign_decays, linear_decay_map

__all__ = [
    "AlphaDecay",
    "UniformDecay",
    "AWD",
    "AdaDecay",
    "TypeDecay",
    "DecayController",
    "DECAY_CONTROLLERS",
    "build_decay",
    "linear_decay_map",
    "assign_decays",
    "ASSIGNS",
    "METRICS",
    "MODULE_SETS",
    "authors_modules",
    "metric_scores",
    "estimate_alphas",
    "controlled_matrices",
    "split_groups",
]

#: name -> controller class (the names ``decay.name`` takes in a training config)
DECAY_CONTROLLERS: dict[str, type[DecayController]] = {
    "uniform": UniformDecay,
    "alphadecay": AlphaDecay,
    "awd": AWD,
    "adadecay": AdaDecay,
    "typedecay": TypeDecay,
}


def build_decay(name: str, optimizer: torch.optim.Optimizer, model: nn.Module, **options: Any) -> DecayController:
    """Build the controller registered as ``name`` with keyword ``options``.

    Raises ``ValueError`` for an unknown name or an option the controller does not take (naming it).
    Call after creating the optimizer and before creating the LR scheduler.
    """
    if name not in DECAY_CONTROLLERS:
        raise ValueError(f"unknown decay controller {name!r}; choose one of {sorted(DECAY_CONTROLLERS)}")
    cls = DECAY_CONTROLLERS[name]
    params = inspect.signature(cls.__init__).parameters
    valid = [k for k in params if k not in ("self", "optimizer", "model")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for decay controller {name!r}; valid: {valid}")
    return cls(optimizer, model, **options)
