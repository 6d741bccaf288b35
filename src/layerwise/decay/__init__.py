"""Weight-decay controllers: AlphaDecay and its baselines.

Every controller is built as ``Controller(optimizer, model, ...)`` at any point after the optimizer (before or
after the LR scheduler and ``optimizer.load_state_dict``), never restructures the optimizer (it only writes
``group["weight_decay"]``), counts optimizer steps itself with a step post-hook, and offers:

* ``table()`` — one row per controlled parameter: ``{"name", "alpha", "weight_decay", ...}``
  (canonical names; ``alpha`` is ``None`` for controllers that compute none);
* ``version`` (how many times the decays were set; log ``table()`` when it changes), ``last_update_step``,
  ``interval`` (``None``: fixed after construction; ``1``: changes every step; ``k``: every k steps);
* ``state_dict()`` / ``load_state_dict()`` (load after building the controller; resume == uninterrupted);
* ``remove()`` — detach the hooks.

Controllers that set a decay per matrix (AlphaDecay, TypeDecay, AdaDecay) need each matrix they control in a
parameter group of its own: build the optimizer from ``layerwise.param_groups(model, ..., per_matrix=...)``
with the value :func:`per_matrix_for` gives (``True``: the block matrices, the default; ``"authors"`` for
``modules="authors"``; the ``select`` option when one is given).  Another layout raises
:class:`GroupLayoutError`, whose message shows that call.

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

from layerwise.decay._base import DecayController, GroupLayoutError, PerMatrix, controlled_matrices
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
    "GroupLayoutError",
    "PerMatrix",
    "check_options",
    "per_matrix_for",
]

#: name -> controller class (the names ``decay.name`` takes in a training config; each class's ``name``)
DECAY_CONTROLLERS: dict[str, type[DecayController]] = {
    cls.name: cls for cls in (UniformDecay, AlphaDecay, AWD, AdaDecay, TypeDecay)
}


def check_options(name: str, options: dict[str, Any]) -> type[DecayController]:
    """The controller class registered as ``name``; ``ValueError`` for an unknown name or an option its
    constructor does not take (naming it and listing the valid ones)."""
    if name not in DECAY_CONTROLLERS:
        raise ValueError(f"unknown decay controller {name!r}; choose one of {sorted(DECAY_CONTROLLERS)}")
    cls = DECAY_CONTROLLERS[name]
    params = inspect.signature(cls.__init__).parameters
    valid = [k for k in params if k not in ("self", "optimizer", "model")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for decay controller {name!r}; valid: {valid}")
    return cls


def per_matrix_for(name: str, **options: Any) -> PerMatrix:
    """The ``per_matrix`` argument of :func:`layerwise.param_groups` that controller ``name`` built with
    ``options`` needs (``False``: any group layout will do)."""
    return check_options(name, options).per_matrix_for(**options)


def build_decay(name: str, optimizer: torch.optim.Optimizer, model: nn.Module, **options: Any) -> DecayController:
    """Build the controller registered as ``name`` with keyword ``options``.

    Raises ``ValueError`` for an unknown name or an option the controller does not take (naming it), and
    :class:`GroupLayoutError` when the optimizer's groups do not have the layout the controller needs
    (build them with ``param_groups(..., per_matrix=per_matrix_for(name, **options))``).
    """
    return check_options(name, options)(optimizer, model, **options)
