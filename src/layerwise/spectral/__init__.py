"""Heavy-tailed self-regularisation (HT-SR) analysis of weight matrices: fast, batched, robust.

* :func:`gram_eigvals` - ascending eigenvalues of the smaller Gram matrix of each 2-D weight (batched by shape);
* :func:`hill_alpha` / :func:`hill_fit` - AlphaDecay's estimator (``xmin = λ[N//2]``);
* :func:`ks_alpha` - Clauset's KS-fitted power law, vectorised over every xmin candidate;
* :func:`noise_alpha` / :func:`shape_corrected_alpha` - α relative to Gaussian noise of the same shape;
* :mod:`~layerwise.spectral.metrics` - spectral/Frobenius norm, stable rank, top-k σ, entropy, α·log10 λmax;
* :func:`analyze` - one :class:`SpectralReport` row per matrix of a model or state dict.

This package never imports :mod:`layerwise.lab`.
"""

from .eig import gram_eigvals, gram_matrices
from .estimators import (
    TailFit,
    hill_alpha,
    hill_fit,
    ks_alpha,
    ks_distance,
    noise_alpha,
    shape_corrected_alpha,
)
from .metrics import (
    alpha_weighted,
    frobenius_norm,
    matrix_entropy,
    spectral_metrics,
    spectral_norm,
    stable_rank,
    top_singular_values,
)
from .report import SpectralReport, analyze, select_matrices

__all__ = [
    "gram_eigvals",
    "gram_matrices",
    "TailFit",
    "hill_alpha",
    "hill_fit",
    "ks_alpha",
    "ks_distance",
    "noise_alpha",
    "shape_corrected_alpha",
    "alpha_weighted",
    "frobenius_norm",
    "matrix_entropy",
    "spectral_metrics",
    "spectral_norm",
    "stable_rank",
    "top_singular_values",
    "analyze",
    "select_matrices",
    "SpectralReport",
]
