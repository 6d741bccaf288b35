"""WidthScaling: exact group values, identity at the base width, classes (ours and HF LLaMA), init, errors."""

from __future__ import annotations

import math

import pytest
import torch
from tests._zoo import hf_llama
from torch import nn

import layerwise as lw
from layerwise.lab.model import build_model
from layerwise.optim.groups import param_groups
from layerwise.scaling import PARAM_CLASSES, WidthScaling, init_std, width_class

LR, WD = 1e-3, 0.1


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (on a loaded 2-core machine two threads spin and run ~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(width: int, base: int = 32, mup: bool = True, **kw):
    return build_model(
        "nano",
        vocab_size=64,
        hidden_size=width,
        intermediate_size=int(width * 2.75),
        parametrization="mup" if mup else "sp",
        base_hidden_size=base,
        **kw,
    )


def _with_multiplier(model):
    q = model.layers[0].self_attn.q_proj
    q.row_multiplier = nn.Parameter(torch.ones(q.out_features))
    return model


def _by_label(groups):
    return {g["group"]: g for g in groups}


# ------------------------------------------------------------------------------------------ classes
@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("layers.0.self_attn.q_proj.weight", (8, 8), "matrix"),
        ("model.layers.3.mlp.down_proj.weight", (8, 16), "matrix"),
        ("layers.0.self_attn.q_proj.bias", (8,), "vector"),
        ("layers.0.input_layernorm.weight", (8,), "vector"),
        ("model.norm.weight", (8,), "vector"),
        ("embed_tokens.weight", (64, 8), "embedding"),
        ("transformer.wte.weight", (64, 8), "embedding"),
        ("module._orig_mod.lm_head.weight", (64, 8), "readout"),
        ("layers.0.self_attn.q_proj.row_multiplier", (8,), "multiplier"),
        ("layers.0.self_attn.q_proj.scalar_multiplier", (1,), "multiplier"),
        ("layers.0.mixer.A_log", (4,), "vector"),
        ("layers.0.mixer.conv1d.weight", (12, 1, 4), "vector"),  # depthwise conv
        ("some.gate_scale", (), None),  # unclassified: no silent default
        ("some.weird.kernel", (4, 4, 3), None),
    ],
)
def test_width_class(name, shape, expected):
    # each name alone, as a state dict: the class comes from the anatomy role
    assert width_class(lw.anatomy({name: torch.zeros(shape)}).by_name(name)) == expected


def test_width_class_bad_input():
    with pytest.raises(TypeError, match="ParamInfo"):
        width_class("a.weight")


def _assert_classes(groups, expected_by_name):
    got = {n: g["group"] for g in groups for n in g["param_names"]}
    assert got == expected_by_name


def test_classes_on_reference_model():
    model = _model(64)
    expected = {}
    for n, _ in model.named_parameters():
        if n == "embed_tokens.weight":
            expected[n] = "embedding"
        elif n == "lm_head.weight":
            expected[n] = "readout"
        elif "norm" in n:
            expected[n] = "vector"
        else:
            assert any(f"{t}_proj" in n for t in ("q", "k", "v", "o", "gate", "up", "down")), n
            expected[n] = "matrix"
    _assert_classes(param_groups(model, LR, WD, WidthScaling(32, 64)), expected)


def _hf_llama(hidden=32, bias=False):
    return hf_llama(hidden, 2 * hidden, heads=2, kv=1, attention_bias=bias, mlp_bias=bias)


def test_classes_on_hf_llama():
    model = _hf_llama(bias=True)
    groups = param_groups(model, LR, WD, WidthScaling(16, 32))
    by_name = {n: g["group"] for g in groups for n in g["param_names"]}
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())
    assert by_name["model.embed_tokens.weight"] == "embedding"
    assert by_name["lm_head.weight"] == "readout"
    assert by_name["model.norm.weight"] == "vector"
    for i in range(2):
        for t in ("q", "k", "v", "o"):
            assert by_name[f"model.layers.{i}.self_attn.{t}_proj.weight"] == "matrix"
            assert by_name[f"model.layers.{i}.self_attn.{t}_proj.bias"] == "vector"
        for t in ("gate", "up", "down"):
            assert by_name[f"model.layers.{i}.mlp.{t}_proj.weight"] == "matrix"
        for t in ("input_layernorm", "post_attention_layernorm"):
            assert by_name[f"model.layers.{i}.{t}.weight"] == "vector"
    by = _by_label(groups)
    assert by["matrix"]["lr"] == pytest.approx(LR / 2, rel=1e-15)
    assert by["matrix"]["weight_decay"] == pytest.approx(WD * math.sqrt(2), rel=1e-15)
    # width check against model.config.hidden_size
    with pytest.raises(ValueError, match="hidden size 32"):
        param_groups(model, LR, WD, WidthScaling(16, 64))


# ------------------------------------------------------------------------------------ exact values
@pytest.mark.parametrize("wd_exponent, wd_factor", [(0.5, 2.0), (0.0, 1.0), (1.0, 4.0)])
def test_exact_group_values_base32_width128(wd_exponent, wd_factor):
    model = _with_multiplier(_model(128))
    rule = WidthScaling(32, 128, wd_exponent=wd_exponent)
    by = _by_label(param_groups(model, LR, WD, rule, multiplier_weight_decay=2e-3))
    m = 4.0
    expected = {  # (lr, weight_decay), from the formulas, independently of the implementation
        "matrix": (LR / m, WD * m**wd_exponent),
        "embedding": (LR, WD),
        "readout": (LR, WD),
        "vector": (LR, 0.0),
        "multiplier": (LR, 2e-3),
    }
    assert set(by) == set(expected)
    for label, (lr, wd) in expected.items():
        assert by[label]["lr"] == pytest.approx(lr, rel=1e-15, abs=0), label
        assert by[label]["weight_decay"] == pytest.approx(wd, rel=1e-15, abs=0), label
    assert by["matrix"]["weight_decay"] == pytest.approx(WD * wd_factor, rel=1e-15)
    assert by["matrix"]["lr_scale"] == pytest.approx(0.25, rel=1e-15)
    assert by["matrix"]["wd_scale"] == pytest.approx(wd_factor, rel=1e-15)
    # coupled per-step shrink lr·λ ∝ m^(wd_exponent − 1): m^-1/2 under √d, constant under mup's MuAdamW
    shrink = by["matrix"]["lr"] * by["matrix"]["weight_decay"]
    assert shrink / (LR * WD) == pytest.approx(m ** (wd_exponent - 1.0), rel=1e-14)
    assert rule.shrink_mult("matrix") == pytest.approx(m ** (wd_exponent - 1.0), rel=1e-14)


def test_non_power_of_two_width_and_exponents():
    rule = WidthScaling(
        32, 96, lr_exponent=0.75, wd_exponent=0.5, embedding_lr_exponent=0.5, embedding_wd_exponent=0.25, readout="lr"
    )
    m = 3.0
    t = rule.table()
    assert t["matrix"]["lr_mult"] == pytest.approx(m**-0.75, rel=1e-15)
    assert t["matrix"]["wd_mult"] == pytest.approx(m**0.5, rel=1e-15)
    assert t["embedding"]["lr_mult"] == pytest.approx(m**-0.5, rel=1e-15)
    assert t["embedding"]["wd_mult"] == pytest.approx(m**0.25, rel=1e-15)
    assert t["readout"]["lr_mult"] == pytest.approx(m**-0.75, rel=1e-15)
    assert t["readout"]["wd_mult"] == 1.0
    assert t["vector"] == {"lr_mult": 1.0, "wd_mult": 1.0, "shrink_mult": 1.0}
    assert t["multiplier"] == {"lr_mult": 1.0, "wd_mult": 1.0, "shrink_mult": 1.0}
    assert set(t) == set(PARAM_CLASSES)


def test_readout_lr_mode_groups():
    by = _by_label(param_groups(_model(128), LR, WD, WidthScaling(32, 128, readout="lr")))
    assert by["readout"]["lr"] == pytest.approx(LR / 4, rel=1e-15) and by["readout"]["weight_decay"] == WD


def test_user_rule_still_width_scaled():
    rule = WidthScaling(32, 128)
    by = _by_label(
        param_groups(_model(128), LR, WD, rule, rules=[(r"mlp\.down_proj", {"group": "down", "lr_scale": 0.5})])
    )
    assert by["down"]["lr"] == pytest.approx(LR / 4 * 0.5, rel=1e-15)
    assert by["down"]["weight_decay"] == pytest.approx(WD * 2, rel=1e-15)


# --------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize(
    "exps",
    [
        dict(),
        dict(lr_exponent=0.3, wd_exponent=1.0, embedding_lr_exponent=1.0, embedding_wd_exponent=0.7, readout="lr"),
    ],
)
@pytest.mark.parametrize("mults", [False, True])
def test_identity_at_base_width(exps, mults):
    model = _model(64, base=64)
    if mults:
        import layerwise.multipliers as mult

        mult.add_multipliers(model)
    ref = param_groups(model, LR, WD, None, multiplier_lr_scale=0.7)
    got = param_groups(model, LR, WD, WidthScaling(64, 64, **exps), multiplier_lr_scale=0.7)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert set(a) == set(b)
        for key in a:
            if key == "params":
                assert [id(p) for p in a[key]] == [id(p) for p in b[key]]
            else:
                assert a[key] == b[key], key  # exact equality, not approximate


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(base_width=0, width=64), "base_width"),
        (dict(base_width=-32, width=64), "base_width"),
        (dict(base_width=32, width=0), "width"),
        (dict(base_width=32, width=48.5), "width"),
        (dict(base_width=True, width=64), "base_width"),
        (dict(base_width=32, width=64, wd_exponent=float("nan")), "wd_exponent"),
        (dict(base_width=32, width=64, lr_exponent="1"), "lr_exponent"),
        (dict(base_width=32, width=64, readout="zero"), "readout"),
    ],
)
def test_width_scaling_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WidthScaling(**kwargs)


def test_model_width_mismatch():
    with pytest.raises(ValueError, match=r"width=128 .*hidden size 64"):
        param_groups(_model(64), LR, WD, WidthScaling(32, 128))
    # named parameters cannot be checked: allowed
    param_groups(list(_model(64).named_parameters()), LR, WD, WidthScaling(32, 128))


def test_from_parametrization():
    assert WidthScaling.from_parametrization("sp", 32, 128) is None
    assert WidthScaling.from_parametrization("mup", 32, 128).wd_exponent == 0.0
    assert WidthScaling.from_parametrization("mup-sqrtwd", 32, 128).wd_exponent == 0.5
    assert WidthScaling.from_parametrization("mup-lrwd", 32, 128).wd_exponent == 1.0
    with pytest.raises(ValueError, match="parametrization"):
        WidthScaling.from_parametrization("ntk", 32, 128)
    assert lw.WidthScaling is WidthScaling


def test_unknown_class_is_an_error():
    with pytest.raises(ValueError, match="parameter class"):
        WidthScaling(32, 64).lr_mult("bias")


# -------------------------------------------------------------------------------------------- init
def test_init_std_formulas():
    assert init_std("matrix", 0.02, 4.0) == pytest.approx(0.01, rel=1e-15)
    assert init_std("embedding", 0.02, 4.0) == 0.02
    assert init_std("readout", 0.02, 4.0) == 0.02
    assert init_std("readout", 0.02, 4.0, readout="lr") == pytest.approx(0.005, rel=1e-15)
    assert WidthScaling(32, 128).init_std("matrix", 0.02) == pytest.approx(0.01, rel=1e-15)
    with pytest.raises(ValueError, match="m"):
        init_std("matrix", 0.02, 0.0)


def test_mup_model_init_variance_scales_as_one_over_fan_in():
    """Empirical weight variance of the μP reference model: var · fan_in is width-invariant for hidden
    matrices (= std_base² · fan_in_base), embedding / readout std stays 0.02, readout multiplier = 1/m."""
    base = 32
    for width in (32, 64, 128):
        torch.manual_seed(0)
        model = _model(width, base=base)
        m = width / base
        assert model.readout_mult == pytest.approx(1 / m, rel=1e-15)
        an = lw.anatomy(model)
        for name, p in model.named_parameters():
            cls = width_class(an.by_name(name))
            if cls == "vector":
                assert torch.equal(p, torch.ones_like(p)), name
                continue
            var = p.detach().double().var().item()
            n = p.numel()
            tol = 5 * math.sqrt(2.0 / n)  # 5 standard errors of a sample variance
            want_std = init_std(cls, 0.02, m)
            assert var == pytest.approx(want_std**2, rel=tol), (name, width)
            if cls == "matrix":
                fan_in, base_fan_in = p.shape[1], p.shape[1] / m
                assert var * fan_in == pytest.approx(0.02**2 * base_fan_in, rel=tol), (name, width)
