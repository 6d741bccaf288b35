"""Layerwise width scaling (Fan et al., arXiv 2510.15262): μP with weight decay ∝ √width, and diagnostics.

* :class:`WidthScaling` - (lr, weight-decay) factors per class (``WidthScaling(base_width, width)``) or per
  tensor from a base model (``WidthScaling.from_models(model, base=...)``); use with
  :func:`layerwise.param_groups`; ``rule.apply_(model)`` does the model-side half of μP (init, readout
  multiplier, attention scale), ``rule.fold_(model)`` folds it into plain weights for export;
* :func:`width_class` - matrix / vector / embedding / readout / multiplier, from an anatomy row
  (:func:`layerwise.anatomy`);
* :func:`init_std` - μP init std per class (variance ∝ 1/fan_in for matrices);
* :class:`SublayerGains` - hooks measuring RMS(out)/RMS(in) per attention/MLP sub-layer;
* :func:`block_top_singular_values` / :func:`top_sv_metrics` - σ_max of every block matrix;
* :func:`coord_check` / :func:`plot_coord_check` - activation scale vs width over a few training steps.

Weight decay is PyTorch's coupled convention by default: one step does ``θ ← θ·(1 − lr·λ)``;
``wd_convention="independent"`` makes λ a per-step shrink ``θ ← θ·(1 − s_t·λ)`` (``s_t = lr_t / lr_peak``).
"""

from __future__ import annotations

from layerwise.scaling.coord import SITES, CoordCheckResult, coord_check, plot_coord_check
from layerwise.scaling.diagnostics import (
    SublayerGain,
    SublayerGains,
    block_top_singular_values,
    top_sv_metrics,
    transformer_blocks,
)
from layerwise.scaling.rules import (
    INIT_MODES,
    PARAM_CLASSES,
    PARAMETRIZATIONS,
    WD_CONVENTIONS,
    WidthScaling,
    init_std,
    width_class,
)
from layerwise.scaling.shapes import AttentionScaling, TensorScaling

__all__ = [
    "INIT_MODES",
    "WD_CONVENTIONS",
    "AttentionScaling",
    "TensorScaling",
    "PARAM_CLASSES",
    "PARAMETRIZATIONS",
    "SITES",
    "CoordCheckResult",
    "SublayerGain",
    "SublayerGains",
    "WidthScaling",
    "coord_check",
    "transformer_blocks",
    "init_std",
    "width_class",
    "plot_coord_check",
    "block_top_singular_values",
    "top_sv_metrics",
]
