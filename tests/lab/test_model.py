import math

import pytest
import torch

from layerwise.lab.model import LlamaModel, apply_rotary, build_model, model_config, rotary_cos_sin


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = build_model("nano", vocab_size=50).eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4


def test_rotary_matches_float64_reference():
    seq, dim, theta = 12, 8, 10000.0
    x = torch.randn(1, 2, seq, dim, dtype=torch.float64)
    cos, sin = rotary_cos_sin(seq, dim, theta)
    got = apply_rotary(x.float(), cos, sin).double()
    # reference: rotate each pair (i, i + dim/2) by angle pos * theta^(-2i/dim), computed in float64
    ref = torch.empty_like(x)
    half = dim // 2
    for pos in range(seq):
        for i in range(half):
            ang = pos * theta ** (-2 * i / dim)
            c, s = math.cos(ang), math.sin(ang)
            x1, x2 = x[..., pos, i], x[..., pos, i + half]
            ref[..., pos, i] = x1 * c - x2 * s
            ref[..., pos, i + half] = x2 * c + x1 * s
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rotary_is_relative():
    # q·k after rotation depends only on the position difference
    dim = 16
    cos, sin = rotary_cos_sin(40, dim, 10000.0)
    q, k = torch.randn(dim), torch.randn(dim)

    def score(pq, pk):
        rq = apply_rotary(q.view(1, 1, 1, dim), cos[pq : pq + 1], sin[pq : pq + 1])
        rk = apply_rotary(k.view(1, 1, 1, dim), cos[pk : pk + 1], sin[pk : pk + 1])
        return float((rq * rk).sum())

    assert score(5, 2) == pytest.approx(score(30, 27), rel=1e-4, abs=1e-5)


def test_hf_parameter_names_and_sizes():
    model = build_model("nano", vocab_size=64)
    names = {n for n, _ in model.named_parameters()}
    for n in (
        "embed_tokens.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.1.mlp.down_proj.weight",
        "layers.0.input_layernorm.weight",
        "layers.0.post_attention_layernorm.weight",
        "norm.weight",
        "lm_head.weight",
    ):
        assert n in names
    tiny = build_model("tiny")
    assert 1e6 <= tiny.num_parameters() <= 3e6
    cfg = model_config("llama-60m")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads) == (512, 1376, 8, 8)


def test_grouped_query_attention_runs_and_has_smaller_kv():
    model = build_model("nano", vocab_size=32, num_heads=4, num_kv_heads=2)
    assert model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    out = model(torch.randint(0, 32, (1, 8)))
    assert out.shape == (1, 8, 32)


def test_init_std_and_mup_width_scaling():
    torch.manual_seed(0)
    sp = build_model("nano", vocab_size=64, hidden_size=256, intermediate_size=512)
    assert sp.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    mup = build_model(
        "nano", vocab_size=64, hidden_size=256, intermediate_size=512, parametrization="mup", base_hidden_size=64
    )
    # width multiplier 4 -> hidden std / 2, embedding and readout std unchanged, logits x 1/4
    assert mup.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert mup.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert mup.readout_mult == 0.25
    # the readout multiplier: logits = (norm(x) · W_headᵀ) / m, against a float64 product of the hooked hidden state
    seen = {}
    mup.norm.register_forward_hook(lambda mod, args, out: seen.__setitem__("h", out.detach()))
    logits = mup(torch.randint(0, 64, (2, 8)))
    ref = (seen["h"].double() @ mup.lm_head.weight.detach().double().T) / 4
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-6)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        model_config("nano", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("huge")
    with pytest.raises(ValueError, match="max_seq_len"):
        LlamaModel(model_config("nano", vocab_size=10))(torch.zeros(1, 65, dtype=torch.long))
