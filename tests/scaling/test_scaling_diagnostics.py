"""Sub-layer gains vs a hand computation, top singular values vs SVD, coordinate check and its plot."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerwise.lab.model import build_model
from layerwise.scaling import (
    SublayerGains,
    block_top_singular_values,
    coord_check,
    plot_coord_check,
    top_sv_metrics,
    transformer_blocks,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (on a loaded 2-core machine two threads spin and run ~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hand_gains(model, batches):
    """Replay the reference model's forward by hand; accumulate Σx² of residual in, normed in, sub-layer out."""
    acc = {}
    with torch.no_grad():
        for idx in batches:
            t = idx.shape[1]
            cos, sin = model.rope_cos[:t], model.rope_sin[:t]
            x = model.embed_tokens(idx)
            for i, blk in enumerate(model.layers):
                for kind, norm, f in (
                    ("attn", blk.input_layernorm, lambda n, blk=blk, cos=cos, sin=sin: blk.self_attn(n, cos, sin)),
                    ("mlp", blk.post_attention_layernorm, blk.mlp),
                ):
                    n = norm(x)
                    y = f(n)
                    a = acc.setdefault((kind, i), [0.0, 0.0, 0.0])
                    a[0] += float(x.double().pow(2).sum())
                    a[1] += float(n.double().pow(2).sum())
                    a[2] += float(y.double().pow(2).sum())
                    x = x + y
    return {k: (math.sqrt(v[2] / v[0]), math.sqrt(v[2] / v[1])) for k, v in acc.items()}


def test_sublayer_gains_match_hand_computation():
    torch.manual_seed(0)
    model = build_model("nano", vocab_size=64)
    # make the layers non-trivial so the two gains differ from each other and across layers
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = [torch.randint(64, (2, 8)), torch.randint(64, (3, 5))]
    with SublayerGains(model) as g:
        for idx in batches:
            model(idx)
    hand = _hand_gains(model, batches)
    res = {(r.kind, r.layer): r for r in g.results()}
    assert set(res) == set(hand) == {(k, i) for k in ("attn", "mlp") for i in range(2)}
    for key, (gain, gain_n) in hand.items():
        assert res[key].gain == pytest.approx(gain, rel=1e-5), key
        assert res[key].gain_normed == pytest.approx(gain_n, rel=1e-5), key
    assert res[("attn", 0)].name == "layers.0.self_attn" and res[("mlp", 1)].name == "layers.1.mlp"
    met = g.metrics()
    assert met["gain/attn/0"] == res[("attn", 0)].gain
    assert met["gain/mlp/mean"] == pytest.approx((res[("mlp", 0)].gain + res[("mlp", 1)].gain) / 2, rel=1e-12)
    assert g.gains()["layers.1.self_attn"] == res[("attn", 1)].gain
    # hooks are gone after the context; further forwards change nothing
    before = g.gains()
    model(batches[0])
    assert g.gains() == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    g.reset()
    assert all(math.isnan(v) for v in g.gains().values())


def test_sublayer_gains_on_hf_llama_residual_rms():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    idx = torch.randint(64, (2, 8))
    with SublayerGains(model) as g, torch.no_grad():
        out = model(idx, output_hidden_states=True)
    res = {(r.kind, r.layer): r for r in g.results()}
    assert set(res) == {(k, i) for k in ("attn", "mlp") for i in range(2)}
    hs = out.hidden_states  # hs[i] = residual stream entering block i (for i < num_layers)
    # the blocks replayed by hand from their parts: gain = rms(sub-layer output) / rms(residual stream in)
    x = hs[0]
    pos = torch.arange(idx.shape[1])[None]
    with torch.no_grad():
        cos_sin = model.model.rotary_emb(x, pos)
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn(
                hidden_states=layer.input_layernorm(x), position_embeddings=cos_sin, attention_mask=None
            )[0]  # no mask: sdpa's causal path, as in the model
            mid = x + a
            y = layer.mlp(layer.post_attention_layernorm(mid))
            rms = {k: t.double().pow(2).mean().sqrt().item() for k, t in (("x", x), ("a", a), ("mid", mid), ("y", y))}
            assert res[("attn", i)].rms_in == pytest.approx(hs[i].double().pow(2).mean().sqrt().item(), rel=1e-5)
            assert res[("attn", i)].gain == pytest.approx(rms["a"] / rms["x"], rel=1e-5)
            assert res[("mlp", i)].gain == pytest.approx(rms["y"] / rms["mid"], rel=1e-5)
            x = mid + y
            if i + 1 < len(model.model.layers):  # the replay is the model's own forward (the last entry is normed)
                torch.testing.assert_close(x, hs[i + 1], rtol=1e-5, atol=1e-6)


def test_transformer_blocks_error():
    with pytest.raises(ValueError, match="no transformer blocks"):
        SublayerGains(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError):
        SublayerGains("model")


def test_block_top_singular_values_match_svd():
    torch.manual_seed(0)
    model = build_model("nano", vocab_size=64)
    top = block_top_singular_values(model, k=3)
    weights = {n: p for n, p in model.named_parameters() if "layers." in n and p.ndim == 2}
    assert set(top) == set(weights)
    for n, w in weights.items():
        ref = torch.linalg.svdvals(w.detach().double())[:3]
        torch.testing.assert_close(top[n].double(), ref, rtol=1e-4, atol=1e-6)
    met = top_sv_metrics(model)
    assert met["top_sv/layers.0.mlp.down_proj.weight"] == pytest.approx(float(top["layers.0.mlp.down_proj.weight"][0]))
    assert met["top_sv/q/mean"] == pytest.approx(
        sum(float(top[f"layers.{i}.self_attn.q_proj.weight"][0]) for i in range(2)) / 2, rel=1e-6
    )
    with pytest.raises(ValueError, match="k"):
        block_top_singular_values(model, k=0)


def test_block_top_singular_values_use_effective_weight():
    import layerwise.multipliers as mult

    torch.manual_seed(0)
    model = build_model("nano", vocab_size=64)
    mult.add_multipliers(model, kind="rowcol", placement="paper")
    q = model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.row_multiplier.uniform_(0.5, 2.0)
        q.col_multiplier.uniform_(0.5, 2.0)
    w_eff = q.row_multiplier.detach()[:, None] * q.weight.detach() * q.col_multiplier.detach()[None, :]
    name = "layers.0.self_attn.q_proj.weight"
    eff = block_top_singular_values(model, k=1)[name]
    raw = block_top_singular_values(model, k=1, effective=False)[name]
    torch.testing.assert_close(eff.double(), torch.linalg.svdvals(w_eff.double())[:1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(raw.double(), torch.linalg.svdvals(q.weight.detach().double())[:1], rtol=1e-4, atol=1e-7)


def _build(mup: bool):
    def build(width: int):
        return build_model(
            "nano",
            vocab_size=64,
            hidden_size=width,
            intermediate_size=int(width * 2.75),
            parametrization="mup" if mup else "sp",
            base_hidden_size=32,
        )

    return build


def test_coord_check_mup_flatter_than_sp(tmp_path):
    widths = [32, 64, 128]
    sp = coord_check(widths, _build(False), steps=3, lr=1e-2, parametrization="sp", label="SP")
    mup = coord_check(widths, _build(True), steps=3, lr=1e-2, parametrization="mup-sqrtwd", weight_decay=0.1)
    assert set(sp.rms) == {"embedding", "attn", "mlp", "residual", "logits"}
    for r in (sp, mup):
        for site in r.rms:
            assert all(len(r.rms[site][w]) == 3 for w in widths)
        assert all(math.isfinite(x) for w in widths for x in r.loss[w])
    # same seed -> identical embedding (unchanged by the parametrisation) before the first update
    for w in widths:
        assert sp.rms["embedding"][w][0] == pytest.approx(mup.rms["embedding"][w][0], rel=1e-6)
    # SP (std 0.02, width-independent LR): sub-layer outputs grow with width; μP keeps them near flat
    for site in ("attn", "mlp", "residual"):
        assert sp.slope(site, 2) > 0.5, site
        assert abs(mup.slope(site, 2)) < 0.6 * sp.slope(site, 2), site
    # the μP readout 1/m makes init logits shrink as m^-1/2 (μP's 1/fan_in² output variance)
    assert mup.slope("logits", 0) == pytest.approx(-0.5, abs=0.15)
    rows = mup.to_rows()
    assert len(rows) == 9 and {"width", "step", "loss", "attn"} <= set(rows[0])

    for x in ("width", "step"):
        path = plot_coord_check(sp, str(tmp_path / f"cc_{x}.png"), x=x)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="x must be"):
        plot_coord_check(sp, str(tmp_path / "bad.png"), x="loss")


def test_coord_check_errors():
    with pytest.raises(ValueError, match="widths"):
        coord_check([], _build(True))
    with pytest.raises(ValueError, match="steps"):
        coord_check([32], _build(True), steps=0)
    with pytest.raises(ValueError, match="parametrization"):
        coord_check([32], _build(True), parametrization="ntk")


def test_transformer_blocks_reference_model():
    model = build_model("nano", vocab_size=64)
    blocks = transformer_blocks(model)
    assert [b.layer for b in blocks] == [0, 1]
    assert (
        blocks[0].attn is model.layers[0].self_attn and blocks[1].mlp_norm is model.layers[1].post_attention_layernorm
    )
