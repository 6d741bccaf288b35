import json
import math

import pytest
import torch
from torch import nn

from layerwise.lab.model import build_model
from layerwise.spectral import (
    SpectralReport,
    analyze,
    gram_eigvals,
    hill_alpha,
    hill_fit,
    ks_alpha,
    select_matrices,
)

BLOCK_TYPES = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("nano", vocab_size=64)


def _svd_hill(w: torch.Tensor) -> float:
    # the authors' way: singular values of the weight, squared, then Hill (independent of gram_eigvals)
    lam = torch.linalg.svdvals(w.detach().double()).flip(0) ** 2
    return hill_alpha(lam)


def test_analyze_our_model_rows_and_values(model):
    rep = analyze(model)
    n_layers = len({r["layer"] for r in rep.rows})
    assert len(rep) == 7 * n_layers
    assert [r["module_type"] for r in rep.rows[:7]] == BLOCK_TYPES
    params = dict(model.named_parameters())
    for r in rep.rows:
        w = params[r["name"]]
        assert r["shape"] == list(w.shape) and r["layer"] == int(r["name"].split(".")[1])
        assert r["alpha"] == pytest.approx(_svd_hill(w), rel=1e-4)
        assert r["spectral_norm"] == pytest.approx(float(torch.linalg.matrix_norm(w.detach(), ord=2)), rel=1e-4)
        assert r["reason"] is None and r["n_tail"] == r["n_eigs"] - r["n_eigs"] // 2
    assert rep.alphas()[rep.rows[0]["name"]] == rep.rows[0]["alpha"]
    with pytest.raises(KeyError):
        rep.by_name("nope")


def test_embeddings_head_all_and_callable(model):
    rep = analyze(model, include_embeddings=True, include_head=True)
    types = [r["module_type"] for r in rep.rows]
    assert types.count("embed") == 1 and types.count("head") == 1
    rep_all = analyze(model, "all")
    assert {r["name"] for r in rep_all.rows} == {n for n, p in model.named_parameters() if p.ndim >= 2}
    rep_q = analyze(model, lambda n, t: n.endswith("q_proj.weight"))
    assert {r["module_type"] for r in rep_q.rows} == {"q"}
    with pytest.raises(ValueError, match="select"):
        analyze(model, "bogus")
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        analyze([torch.ones(3, 3)])


def test_state_dict_with_hf_names_equals_module(model):
    sd = {"model." + k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    sd["lm_head.weight"] = model.state_dict()["lm_head.weight"]
    rep_sd = analyze(sd, include_embeddings=True, include_head=True)
    rep_m = analyze(model, include_embeddings=True, include_head=True)
    assert [r["name"] for r in rep_sd.rows][:3] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ]
    assert sorted(r["alpha"] for r in rep_sd.rows) == pytest.approx(sorted(r["alpha"] for r in rep_m.rows))
    assert [r["layer"] for r in rep_sd.rows[:7]] == [0] * 7
    # prefixes from wrappers are stripped
    wrapped = {"module._orig_mod." + k: v for k, v in sd.items()}
    assert [r["name"] for r in analyze(wrapped).rows] == [r["name"] for r in analyze(sd).rows]


def test_multiplier_wrapped_linear_and_plain_module():
    class Wrapped(nn.Module):
        _layerwise_linear = True

        def __init__(self, d_in, d_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_out, d_in))
            self.row_multiplier = nn.Parameter(torch.ones(d_out))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = Wrapped(16, 16)
            self.down_proj = nn.Linear(24, 16)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.lm_head = nn.Linear(16, 30)

    net = Net()
    rep = analyze(net)
    assert [r["name"] for r in rep.rows] == [
        "layers.0.q_proj.weight",
        "layers.0.down_proj.weight",
        "layers.1.q_proj.weight",
        "layers.1.down_proj.weight",
    ]
    sd_rep = analyze(net.state_dict())  # row_multiplier (1-D) and biases ignored
    assert [r["name"] for r in sd_rep.rows] == [r["name"] for r in rep.rows]
    # a model without blocks: every Linear
    plain = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12))
    assert [r["name"] for r in analyze(plain).rows] == ["0.weight", "2.weight"]


def test_robustness_rows_and_skips():
    torch.manual_seed(0)
    sd = {
        "layers.0.q_proj.weight": torch.randn(32, 32),
        "layers.0.k_proj.weight": torch.zeros(32, 32),
        "layers.0.v_proj.weight": torch.randn(32, 1) @ torch.randn(1, 32),
        "layers.0.o_proj.weight": torch.randn(32, 32).index_put_(
            (torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))
        ),
        "layers.0.gate_proj.weight": torch.full((32, 32), float("inf")),
        "layers.0.up_proj.weight": torch.randn(5, 7),
        "layers.0.down_proj.weight": torch.randn(1, 64),
        "layers.0.mlp.fc2.weight": torch.randn(4000, 12),  # huge aspect ratio
        "layers.0.conv.weight": torch.randn(4, 3, 3),
        "layers.0.input_layernorm.weight": torch.ones(32),
        "layers.0.q_proj.row_multiplier": torch.ones(32),
        "layers.1.q_proj.weight": torch.randn(16, 16).bfloat16(),
    }
    rep = analyze(sd)
    rows = {r["name"].split(".", 2)[2]: r for r in rep.rows}
    assert math.isfinite(rows["q_proj.weight"]["alpha"]) and rows["q_proj.weight"]["reason"] is None
    assert "zero matrix" in rows["k_proj.weight"]["reason"]
    assert "rank-deficient" in rows["v_proj.weight"]["reason"]
    assert "non-finite" in rows["o_proj.weight"]["reason"] and "non-finite" in rows["gate_proj.weight"]["reason"]
    assert "too few" in rows["up_proj.weight"]["reason"] and "too few" in rows["down_proj.weight"]["reason"]
    huge = rows["mlp.fc2.weight"]
    assert huge["n_eigs"] == 12 and math.isfinite(huge["alpha"])
    for r in rep.rows:
        if r["reason"] is not None:
            assert math.isnan(r["alpha"])
    assert math.isfinite(rep.by_name("layers.1.q_proj.weight")["alpha"])
    # a convolution kernel is not a block matrix (anatomy role "conv"); asked for, it is skipped with a reason
    assert rep.skipped == [] and "layers.0.conv.weight" not in rep.alphas()
    assert analyze(sd, "all").skipped == [
        {"name": "layers.0.conv.weight", "shape": [4, 3, 3], "reason": "not a matrix (3-D tensor)"}
    ]
    # JSON: NaN -> null, round trip
    d = json.loads(rep.to_json())
    assert d["rows"][1]["alpha"] is None
    back = SpectralReport.from_json(rep.to_json())
    assert math.isnan(back.rows[1]["alpha"]) and back.rows[0]["alpha"] == rep.rows[0]["alpha"]
    md = rep.to_markdown()
    assert "layers.0.k_proj.weight" in md and "zero matrix" in md
    assert "skipped" in analyze(sd, "all").to_markdown()


def test_estimators_and_shape_correction(model):
    rep = analyze(model, estimator="ks", shape_correction="difference", keep_eigs=True)
    w = dict(model.named_parameters())
    names = [r["name"] for r in rep.rows]
    fits = ks_alpha(gram_eigvals([w[n] for n in names]))
    assert [r["alpha"] for r in rep.rows] == pytest.approx(fits.alpha.tolist(), rel=1e-6)
    assert [r["n_tail"] for r in rep.rows] == fits.n_tail.tolist()
    assert all("alpha_corrected" in r for r in rep.rows) and set(rep.eigs) == set(names)
    custom = analyze(model, estimator=lambda eigs: hill_fit(eigs, min_n=10))
    assert custom.alphas() == analyze(model).alphas()
    with pytest.raises(TypeError, match="TailFit"):
        analyze(model, estimator=lambda eigs: [1.0] * len(eigs))
    with pytest.raises(ValueError, match="estimator"):
        analyze(model, estimator="bogus")
    with pytest.raises(ValueError, match="shape_correction"):
        analyze(model, shape_correction="bogus")


def test_select_matrices_dedupes_tied_head():
    emb = nn.Embedding(20, 8)
    head = nn.Linear(8, 20, bias=False)
    head.weight = emb.weight

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens, self.lm_head = emb, head

    # one tensor, one row (under its first name), whether asked for as embedding, head or both
    for kw in (
        {"include_embeddings": True},
        {"include_head": True},
        {"include_embeddings": True, "include_head": True},
    ):
        names = [info.name for info, _ in select_matrices(M(), "blocks", **kw)]
        assert names == ["embed_tokens.weight"], kw
