import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerwise.spectral import gram_eigvals, hill_fit, ks_alpha
from layerwise.spectral.metrics import spectral_metrics

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, log_scale=st.floats(-3, 3), seed=st.integers(0, 2**16), rank=st.integers(0, 24))
def test_random_matrices_always_give_a_defined_result(shape, log_scale, seed, rank):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=torch.float64) * 10.0**log_scale
    r = min(rank, *shape)
    if r < min(shape):  # plant a rank
        w = (
            (
                torch.randn(shape[0], max(r, 1), generator=g, dtype=torch.float64)
                @ torch.randn(max(r, 1), shape[1], generator=g, dtype=torch.float64)
            )
            * 10.0**log_scale
            * (r > 0)
        )
    e = gram_eigvals(w, torch.float64)
    assert e.shape == (min(shape),) and bool((e >= 0).all()) and bool((e[1:] >= e[:-1]).all())
    for fit in (hill_fit(e), ks_alpha(e, min_tail=2)):
        if math.isnan(fit.alpha):
            assert isinstance(fit.reason, str) and fit.reason
        else:
            assert fit.alpha > 1 and fit.reason is None and 0 <= fit.ks <= 1
    m = spectral_metrics(e, hill_fit(e).alpha)
    assert math.isnan(m["stable_rank"]) or 1 - 1e-9 <= m["stable_rank"] <= min(shape) + 1e-9


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(4, 24), st.integers(4, 24)), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 999))
def test_alpha_is_scale_invariant(shape, scale, seed):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a1 = hill_fit(gram_eigvals(w, torch.float64)).alpha
    a2 = hill_fit(gram_eigvals(w * scale, torch.float64)).alpha
    assert math.isclose(a1, a2, rel_tol=1e-8) or (math.isnan(a1) and math.isnan(a2))
