import math

import pytest
import torch

from layerwise.spectral import (
    alpha_weighted,
    frobenius_norm,
    gram_eigvals,
    matrix_entropy,
    spectral_metrics,
    spectral_norm,
    stable_rank,
    top_singular_values,
)


def test_metrics_against_torch_references():
    torch.manual_seed(0)
    w = torch.randn(30, 18, dtype=torch.float64)
    e = gram_eigvals(w, torch.float64)
    sv = torch.linalg.svdvals(w)
    assert spectral_norm(e) == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-10)
    assert frobenius_norm(e) == pytest.approx(float(torch.linalg.matrix_norm(w)), rel=1e-10)
    assert stable_rank(e) == pytest.approx(float((sv**2).sum() / sv[0] ** 2), rel=1e-10)
    assert top_singular_values(e, 3) == pytest.approx(sv[:3].tolist(), rel=1e-10)
    assert len(top_singular_values(e, 100)) == 18
    p = sv**2 / (sv**2).sum()
    assert matrix_entropy(e) == pytest.approx(float(-(p * p.log()).sum() / math.log(18)), rel=1e-10)
    assert alpha_weighted(2.5, e) == pytest.approx(2.5 * math.log10(float(sv[0]) ** 2))
    m = spectral_metrics(e, 2.5, top_k=2)
    assert m["top_sv"] == pytest.approx(sv[:2].tolist()) and m["lambda_max"] == pytest.approx(float(sv[0]) ** 2)


def test_metric_edge_cases():
    assert matrix_entropy(torch.ones(8)) == pytest.approx(1.0)
    assert matrix_entropy(torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(0.0)
    assert math.isnan(matrix_entropy(torch.zeros(4)))
    assert math.isnan(stable_rank(torch.zeros(4)))
    assert math.isnan(alpha_weighted(float("nan"), torch.ones(3)))
    m = spectral_metrics(torch.tensor([1.0, float("nan")]))
    assert math.isnan(m["spectral_norm"]) and m["top_sv"] == []
    with pytest.raises(ValueError, match="1-D"):
        spectral_norm(torch.ones(2, 2))
