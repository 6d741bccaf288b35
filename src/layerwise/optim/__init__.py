"""Optimizers and parameter-group rules.

* :class:`AlphaAdam`, :class:`CautiousAdamW` - masked AdamW variants (``alphaadam.py``);
* :func:`param_groups` - name-based parameter groups with width scaling and a multiplier group (``groups.py``);
* :func:`clip_grad_norm_` - global-norm clipping that can leave parameters out (``clip.py``);
* :class:`MuonAdamW` - ``torch.optim.Muon`` on block matrices, AdamW on the rest (``muon.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AlphaAdam": "alphaadam",
    "CautiousAdamW": "alphaadam",
    "param_groups": "groups",
    "clip_grad_norm_": "clip",
    "MuonAdamW": "muon",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'layerwise.optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"layerwise.optim.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
