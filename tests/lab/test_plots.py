"""Plot helpers whose numbers can be checked."""

import math

import pytest
import torch

from layerwise.lab.analyze import esd_density_at


def test_esd_fit_anchor_is_the_loglog_interpolated_density():
    centers = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    dens = torch.tensor([1.0, 1e-2, 1e-4], dtype=torch.float64)  # density x^-2
    assert esd_density_at(centers, dens, 10**0.5) == pytest.approx(0.1)
    assert esd_density_at(centers, dens, 50.0) == pytest.approx(50.0**-2)
    assert esd_density_at(centers, dens, 0.1) == 1.0 and esd_density_at(centers, dens, 1e3) == 1e-4  # clamped
    assert math.isfinite(esd_density_at(centers, dens, 10.0))
