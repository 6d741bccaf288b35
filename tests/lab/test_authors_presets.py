"""The presets follow the AlphaDecay authors' scripts per optimizer; the decay options reach the controllers."""

from __future__ import annotations

import pytest
import torch

from layerwise.decay import AWD, AdaDecay, AlphaDecay
from layerwise.lab import methods
from layerwise.lab.config import ConfigError, apply_overrides, preset
from layerwise.lab.model import build_model


@pytest.mark.parametrize(
    "name,optim,wd,s2",
    [
        ("llama-60m", "adamw", 0.1, 5.0),
        ("llama-135m", "adamw", 0.1, 5.0),
        ("llama-60m-adam", "adam", 1e-5, 3.0),
        ("llama-135m-adam", "adam", 1e-5, 3.0),
    ],
)
def test_paper_presets_per_optimizer(name, optim, wd, s2):
    cfg = preset(name)
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.decay.s1, cfg.decay.s2) == (optim, wd, 0.6666, s2)
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.data.seq_len, cfg.decay.interval) == (1e-3, 512, 256, 500)
    assert cfg.optim.grad_clip == 0.0 and cfg.optim.min_lr_ratio == 0.1 and cfg.optim.warmup_frac == 0.1


def _build(overrides):
    cfg = apply_overrides(preset("smoke"), overrides)
    torch.manual_seed(0)
    model = build_model("nano", vocab_size=64, hidden_size=64, intermediate_size=176, num_heads=4, num_kv_heads=4)
    opt = torch.optim.AdamW(methods.build_param_groups(model, cfg, None))  # the layout the controller needs
    return methods.build_decay(opt, model, cfg)


def test_decay_options_reach_the_controllers():
    dec = _build(
        {
            **methods.METHODS["alphadecay-authors"],
            "decay.metric": "stable_rank",
            "decay.assign": "sigmoid",
            "decay.slope": 2.0,
        }
    )
    assert isinstance(dec, AlphaDecay)
    assert (dec.modules, dec.timing, dec.metric, dec.assign, dec.slope) == (
        "authors",
        "before",
        "stable_rank",
        "sigmoid",
        2.0,
    )
    assert dec.names[0] == "layers.0.self_attn.k_proj.weight"  # layer 0's q_proj is the first nn.Linear
    ada = _build({"decay.name": "adadecay", "decay.interval": 7})
    assert isinstance(ada, AdaDecay) and (ada.interval, ada.norm, ada.slope) == (7, "raw", 4.0)
    awd = _build({"decay.name": "awd", "decay.lambda_awd": "authors"})
    assert isinstance(awd, AWD) and float(awd.calib) == pytest.approx(100 * 0.1)
    awd = _build({"decay.name": "awd", "decay.lambda_awd": "0.5"})
    assert float(awd.calib) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="decay.lambda_awd"):
        _build({"decay.name": "awd", "decay.lambda_awd": "lots"})
    with pytest.raises(ConfigError, match="metric"):
        _build({"decay.name": "alphadecay", "decay.metric": "gradnorm"})
