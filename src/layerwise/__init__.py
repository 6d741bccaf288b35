"""layerwise: module-wise optimisation control for LLM pre-training.

Four methods as composable PyTorch parts (see README.md):

* :class:`AlphaDecay` - per-module weight decay from the heavy-tail exponent of each weight spectrum;
* :class:`AlphaAdam` - AdamW with a sign-agreement update mask and per-tensor compensation
  (and :class:`CautiousAdamW`, its closest peer);
* :func:`add_multipliers` / :func:`merge_multipliers` - learnable row/column/scalar multipliers;
* :class:`WidthScaling` with :func:`param_groups` - muP width scaling with weight decay ~ sqrt(width);
* :func:`anatomy` - what every parameter of any model is (role, block, operator, fan-in/out); every method
  above asks it.

The library never imports :mod:`layerwise.lab` (our training harness); the harness imports it.
Public names are resolved lazily so ``import layerwise`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "spectral": ("layerwise.spectral", None),
    "decay": ("layerwise.decay", None),
    "optim": ("layerwise.optim", None),
    "scaling": ("layerwise.scaling", None),
    "multipliers": ("layerwise.multipliers", None),
    "names": ("layerwise.names", None),
    "anatomy": ("layerwise.anatomy", None),  # callable module: lw.anatomy(model) -> Anatomy
    "Anatomy": ("layerwise.anatomy", "Anatomy"),
    "ParamInfo": ("layerwise.anatomy", "ParamInfo"),
    "AlphaDecay": ("layerwise.decay", "AlphaDecay"),
    "GroupLayoutError": ("layerwise.decay", "GroupLayoutError"),
    "AlphaAdam": ("layerwise.optim", "AlphaAdam"),
    "CautiousAdamW": ("layerwise.optim", "CautiousAdamW"),
    "param_groups": ("layerwise.optim", "param_groups"),
    "clip_grad_norm_": ("layerwise.optim", "clip_grad_norm_"),
    "add_multipliers": ("layerwise.multipliers", "add_multipliers"),
    "merge_multipliers": ("layerwise.multipliers", "merge_multipliers"),
    "UntrainedParameterWarning": ("layerwise._coverage", "UntrainedParameterWarning"),
    "WidthScaling": ("layerwise.scaling", "WidthScaling"),
    "canonical_name": ("layerwise.names", "canonical_name"),
    "schedules": ("layerwise.schedules", None),
    "Schedule": ("layerwise.schedules", "Schedule"),
    "lr_scheduler": ("layerwise.schedules", "lr_scheduler"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'layerwise' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
