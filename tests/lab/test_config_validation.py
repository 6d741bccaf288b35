"""Config values that would fail later are refused up front with a ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import get_type_hints

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerwise.lab import config as C
from layerwise.lab.cli import main
from layerwise.lab.train import resolve_model_config, validate

KEYS = {f"{sec}.{k}": typ for sec, sec_type in C._SECTION_TYPES.items() for k, typ in get_type_hints(sec_type).items()}
KEY_RE = re.compile(r"\b((?:model|data|optim|decay|multipliers|train)\.[a-z_0-9]+)")


def _named_keys(msg: str) -> set[str]:
    return {k for k in KEY_RE.findall(msg) if k in KEYS}


@pytest.mark.parametrize(
    "over, key",
    [
        ({"model.hidden_size": 6, "model.num_heads": 2}, "model.hidden_size"),  # head size 3: RoPE needs even
        ({"model.hidden_size": 30, "model.num_heads": 4}, "model.num_heads"),
        ({"model.num_heads": 4, "model.num_kv_heads": 3}, "model.num_kv_heads"),
        ({"train.num_threads": -1}, "train.num_threads"),
        ({"train.seed": -1}, "train.seed"),
        ({"optim.beta2": math.nan}, "optim.beta2"),
        ({"optim.eps": math.nan}, "optim.eps"),
        ({"optim.lr": math.inf}, "optim.lr"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"train.grad_accum": 3}, "train.grad_accum"),  # smoke's batch 4
        ({"data.corpus": "x" * 100_000}, "data.corpus"),
        ({"data.corpus": "a/" + "b" * 300}, "data.corpus"),
        ({"data.vocab_size": 70000}, "data.vocab_size"),
        ({"train.keep_checkpoints": 0}, "train.keep_checkpoints"),
        ({"train.dist_timeout_s": 0.0}, "train.dist_timeout_s"),
        ({"decay.name": "alphadecay", "decay.s1": 4.0, "decay.s2": 3.0}, "decay.s1"),
        ({"optim.alpha_max": 0.5}, "optim.alpha_max"),
    ],
)
def test_value_that_would_fail_later_is_refused_naming_the_key(over, key):
    cfg = C.apply_overrides(C.preset("smoke"), over)
    with pytest.raises(C.ConfigError) as e:
        validate(cfg)
    assert key in str(e.value)


def test_config_file_that_is_a_directory_or_not_utf8_is_named(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert f"config file {tmp_path} is a directory" in capsys.readouterr().err
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[optim]\nname = "adamw"  # caf\xe9\n'.encode("latin-1"))
    assert main(["train", "--config", str(latin), "--out", str(tmp_path / "r")]) == 2
    assert f"config file {latin} is not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


_INTS = st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 4, 6, 7, 16, 33, 64, 2**31, 2**40]) | st.integers(-5, 300)
_FLOATS = st.sampled_from(
    [math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e-30, 0.5, 0.95, 1.0, 1.5, 3.0, 1e30]
) | st.floats(-10, 10, allow_nan=False)
_CHOICES = sorted(
    {
        "none",
        "ddp",
        "fsdp",
        "cpu",
        "cuda",
        "auto",
        "fp32",
        "bf16",
        "sp",
        "mup",
        "sqrt",
        "hill",
        "ks",
        "previous",
        "current",
        "norm",
        "density",
        "rowcol",
        "row",
        "col",
        "scalar",
        "paper",
        "symmetry_free",
        "adamw",
        "adam",
        "alphaadam",
        "muon",
        "alphadecay",
        "uniform",
        "awd",
        "nano",
        "tiny",
        "bogus",
        "",
        "x" * 5000,
        "a\x00b",
        "shakespeare",
    }
)


def _value(typ):
    return {int: _INTS, float: _FLOATS, bool: st.booleans(), str: st.sampled_from(_CHOICES)}[typ]


_OVERRIDE = st.sampled_from(sorted(KEYS)).flatmap(
    lambda k: st.tuples(st.just(k), _value(KEYS[k]) | st.sampled_from([1, 0.5, "s", True]))
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OVERRIDE, min_size=1, max_size=3))
def test_random_overrides_fail_only_with_a_config_error_naming_a_key(overrides):
    """Property: any combination of overrides is either accepted by validation (and then resolves to a model
    config) or refused with a ConfigError that names a real key — never another exception."""
    cfg = C.preset("smoke")
    try:
        C.apply_overrides(cfg, dict(overrides))
        validate(cfg)
        if cfg.model.hf_config or cfg.model.init_from:  # a Hugging Face model resolves its own config file
            from layerwise.lab.hf_models import resolve_hf_config

            resolve_hf_config(cfg, cfg.data.vocab_size)
        else:
            resolve_model_config(cfg, cfg.data.vocab_size)
    except C.ConfigError as e:
        assert _named_keys(str(e)), f"ConfigError names no key: {e}"
        return
    # accepted: the values the run reads are in range
    assert cfg.train.batch_size % cfg.train.grad_accum == 0 and cfg.train.seed >= 0
    assert all(
        math.isfinite(v)
        for s in dataclasses.fields(cfg)
        for v in dataclasses.asdict(getattr(cfg, s.name)).values()
        if isinstance(v, float)
    )
