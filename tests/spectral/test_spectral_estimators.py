import math

import numpy as np
import pytest
import torch
from _refs import np_hill, np_ks_dist, np_ks_search, planted

from layerwise.spectral import (
    gram_eigvals,
    hill_alpha,
    hill_fit,
    ks_alpha,
    ks_distance,
    noise_alpha,
    shape_corrected_alpha,
)


def test_hill_matches_float64_numpy_reference():
    rng = np.random.default_rng(0)
    spectra = [np.sort(rng.lognormal(size=n)) for n in (3, 10, 11, 64, 257)]
    spectra += [gram_eigvals(torch.randn(40, 70)).numpy()]
    got = hill_alpha([torch.tensor(s) for s in spectra])
    assert got.dtype == torch.float64 and got.shape == (len(spectra),)
    for g, s in zip(got.tolist(), spectra):
        assert g == pytest.approx(np_hill(s), rel=1e-6)
    # single vector -> float; 2-D batch -> tensor
    assert isinstance(hill_alpha(torch.tensor(spectra[3])), float)
    batch = torch.tensor(np.stack([spectra[3], spectra[3] * 2]))
    torch.testing.assert_close(hill_alpha(batch), torch.tensor([np_hill(spectra[3])] * 2, dtype=torch.float64))


def test_hill_fit_fields():
    lam = torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0, 16.0])
    fit = hill_fit(lam)
    assert fit.xmin == 4.0 and fit.n_tail == 3 and fit.reason is None
    assert fit.alpha == pytest.approx(1 + 3 / (math.log(2) + math.log(4)))
    assert fit.ks == pytest.approx(np_ks_dist([4.0, 8.0, 16.0], 4.0, fit.alpha))


def test_tail_fit_tensors_one_entry_per_input():
    lam = torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0, 16.0])
    single = hill_fit(lam)
    a, x, k, n = single.tensors()
    assert [t.shape for t in (a, x, k, n)] == [(1,)] * 4
    assert (float(a[0]), float(x[0]), float(k[0]), int(n[0])) == (single.alpha, 4.0, single.ks, 3)
    batch = hill_fit([lam, lam * 2, torch.zeros(6)])
    a, x, k, n = batch.tensors()
    torch.testing.assert_close(a, batch.alpha, equal_nan=True, rtol=0, atol=0)
    assert n.tolist() == [3, 3, 0] and x.tolist()[:2] == [4.0, 8.0] and math.isnan(a[2])


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_planted_power_law_is_recovered(alpha):
    hills, kss = [], []
    for seed in range(3):
        w, lam = planted(400, 300, alpha, seed)
        e = gram_eigvals(torch.tensor(w, dtype=torch.float32))
        np.testing.assert_allclose(e.double().numpy(), lam, rtol=2e-3)  # the construction plants the spectrum
        hills.append(hill_alpha(e))
        kss.append(ks_alpha(e).alpha)
    assert np.mean(hills) == pytest.approx(alpha, abs=0.15 * (alpha - 1))
    assert np.mean(kss) == pytest.approx(alpha, abs=0.2 * (alpha - 1))


def test_ks_search_equals_brute_force_loop():
    rng = np.random.default_rng(3)
    cases = [np.sort(rng.pareto(1.5, size=n) + 1) for n in (12, 30, 57)]
    cases.append(np.sort(np.concatenate([rng.lognormal(size=25), [3.0, 3.0, 3.0, 5.0]])))  # ties
    cases.append(np.sort(np.concatenate([np.zeros(5), rng.lognormal(size=20)])))  # zeros are not candidates
    fits = ks_alpha([torch.tensor(c) for c in cases], min_tail=4)
    for k, c in enumerate(cases):
        a, xm, d, n = np_ks_search(c, min_tail=4)
        assert float(fits.alpha[k]) == pytest.approx(a, rel=1e-9)
        assert float(fits.xmin[k]) == pytest.approx(xm, rel=1e-12)
        assert float(fits.ks[k]) == pytest.approx(d, rel=1e-9, abs=1e-12)
        assert int(fits.n_tail[k]) == n
    # xmin_range restricts candidates
    c = cases[2]
    lo, hi = float(c[10]), float(c[30])
    f = ks_alpha(torch.tensor(c), (lo, hi), min_tail=4)
    a, xm, d, n = np_ks_search(c, min_tail=4, lo=lo, hi=hi)
    assert lo <= f.xmin <= hi and f.xmin == pytest.approx(xm) and f.alpha == pytest.approx(a, rel=1e-9)


def test_ks_chunking_does_not_change_result(monkeypatch):
    import layerwise.spectral.estimators as est

    e = torch.tensor(np.sort(np.random.default_rng(5).pareto(2.0, size=200) + 1))
    full = ks_alpha(e)
    monkeypatch.setattr(est, "_CHUNK_ELEMS", 1000)
    part = ks_alpha(e)
    assert (full.alpha, full.xmin, full.ks, full.n_tail) == (part.alpha, part.xmin, part.ks, part.n_tail)


def test_ks_distance_matches_reference():
    tail = torch.tensor([1.0, 1.5, 2.0, 4.0, 9.0])
    assert ks_distance(tail, 1.0, 2.2) == pytest.approx(np_ks_dist(tail.numpy(), 1.0, 2.2))
    assert math.isnan(ks_distance(tail, 0.0, 2.0))


@pytest.mark.parametrize(
    "lam, reason",
    [
        (torch.zeros(20), "zero matrix"),
        (torch.cat([torch.zeros(19), torch.ones(1)]), "numerically zero"),
        (torch.ones(20), "flat tail"),
        (torch.tensor([1.0, float("nan"), 2.0]), "non-finite"),
        (torch.tensor([2.0]), "flat tail"),
        (torch.empty(0), "empty"),
    ],
)
def test_undefined_cases_give_nan_and_reason(lam, reason):
    fit = hill_fit(lam)
    assert math.isnan(fit.alpha) and reason in fit.reason
    kfit = ks_alpha(lam, min_tail=2)
    assert math.isnan(kfit.alpha) and kfit.reason is not None


def test_min_n_and_argument_errors():
    lam = torch.arange(1.0, 9.0)
    assert "too few" in hill_fit(lam, min_n=10).reason
    assert math.isfinite(hill_fit(lam).alpha)
    with pytest.raises(ValueError, match="min_tail"):
        ks_alpha(lam, min_tail=1)
    with pytest.raises(ValueError, match="1-D"):
        hill_alpha([torch.ones(2, 2)])
    with pytest.raises(TypeError, match="eigs\\[0\\]"):
        hill_alpha([[1.0, 2.0]])


def test_noise_reference_and_shape_correction():
    sq = noise_alpha((256, 256))
    tall = noise_alpha((2.7 * 256 // 1, 256))
    assert sq == pytest.approx(2.13, abs=0.1)
    assert tall == pytest.approx(3.0, abs=0.15)
    assert noise_alpha((256, 256)) == sq  # cached / deterministic
    assert shape_corrected_alpha(sq, (256, 256)) == pytest.approx(2.0)
    assert shape_corrected_alpha(3.5, (256, 256), mode="ratio") == pytest.approx(3.5 / sq)
    # a fresh noise matrix of another shape reads ≈ 2 after correction
    e = gram_eigvals(torch.randn(1000, 370, generator=torch.Generator().manual_seed(9)))
    assert shape_corrected_alpha(hill_alpha(e), (1000, 370)) == pytest.approx(2.0, abs=0.15)
    with pytest.raises(ValueError, match="mode"):
        shape_corrected_alpha(2.0, (4, 4), mode="bogus")
    with pytest.raises(ValueError, match="estimator"):
        noise_alpha((4, 4), "median")
