"""``optim.alpha_lag`` in a training config and in ``layerwise compare``'s method specs."""

from __future__ import annotations

import pytest
import torch

from layerwise.lab import config as C
from layerwise.lab.methods import build_optimizer, method_overrides
from layerwise.lab.train import validate


@pytest.mark.parametrize("method", ["alphaadam", "cautious"])
def test_method_spec_sets_alpha_lag_on_the_optimizer(method):
    over = method_overrides(f"{method}[optim.alpha_lag=1]")
    assert over == {"optim.name": method, "optim.alpha_lag": 1}
    cfg = C.apply_overrides(C.preset("smoke"), over)
    validate(cfg)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt = build_optimizer(model, cfg, None, "cpu")
    assert {g["alpha_lag"] for g in opt.param_groups} == {1}
    default = build_optimizer(model, C.apply_overrides(C.preset("smoke"), {"optim.name": method}), None, "cpu")
    assert {g["alpha_lag"] for g in default.param_groups} == {0}  # the exact rule stays the default


@pytest.mark.parametrize("bad", [2, -1, True])
def test_invalid_alpha_lag_is_refused_naming_the_key(bad):
    with pytest.raises(C.ConfigError, match="optim.alpha_lag"):  # by type (True) or by value
        validate(C.apply_overrides(C.preset("smoke"), {"optim.name": "alphaadam", "optim.alpha_lag": bad}))
