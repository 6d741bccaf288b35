"""Layerwise width scaling (Fan et al., arXiv 2510.15262): μP with weight decay ∝ √width, and diagnostics.

* :class:`WidthScaling` - per-class (lr, weight-decay) factors; use with :func:`layerwise.param_groups`;
* :func:`classify_parameter` / :func:`param_class` - matrix / vector / embedding / readout / multiplier,
  from canonical names and shapes;
* :func:`init_std` - μP init std per class (variance ∝ 1/fan_in for matrices);
* :class:`SublayerGains` - hooks measuring RMS(out)/RMS(in) per attention/MLP sub-layer;
* :func:`top_singular_values` / :func:`top_sv_metrics` - σ_max of every block matrix;
* :func:`coord_check` / :func:`plot_coord_check` - activation scale vs width over a few training steps.

Weight decay is PyTorch's coupled convention: one step does ``θ ← θ·(1 − lr·λ)``.
"""
from __future__ import annotations

from layerwise.scaling.coord import SITES, CoordCheckResult, coord_check, plot_coord_check
from layerwise.scaling.diagnostics import (
    SublayerGain,
    SublayerGains,
    find_blocks,
    top_singular_values,
    top_sv_metrics,
)
from layerwise.scaling.rules import (
    PARAM_CLASSES,
    PARAMETRIZATIONS,
    WidthScaling,
    classify_parameter,
    init_std,
    param_class,
)

__all__ = [
    "PARAM_CLASSES",
    "PARAMETRIZATIONS",
    "SITES",
    "CoordCheckResult",
    "SublayerGain",
    "SublayerGains",
    "WidthScaling",
    "classify_parameter",
    "coord_check",
    "find_blocks",
    "init_std",
    "param_class",
    "plot_coord_check",
    "top_singular_values",
    "top_sv_metrics",
]
