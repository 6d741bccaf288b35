"""layerwise.anatomy over a zoo of tiny models built from configs (tests/_zoo.py), and every method using it.

The expected role of every parameter is written by hand below (not produced by the code under test).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import _zoo
import layerwise as lw
from layerwise import anatomy as anatomy_mod
from layerwise.multipliers import add_multipliers, merge_multipliers, merge_multipliers_state_dict
from layerwise.spectral import analyze

pytest.importorskip("transformers")

BM, EMB, POS, INP, MAT, OUT = "block_matrix", "embedding", "position_embedding", "input", "matrix", "readout"
NORM, BIAS, SSM, CONV = "norm", "bias", "ssm_vector", "conv"


def _expand(per_layer: dict[str, str], other: dict[str, str], layers: int = 2) -> dict[str, str]:
    out = dict(other)
    for i in range(layers):
        out.update({k.format(i=i): v for k, v in per_layer.items()})
    return out


def _wb(prefix: str, w: str, b: str = BIAS) -> dict[str, str]:
    return {f"{prefix}.weight": w, f"{prefix}.bias": b}


_LLAMA_LAYER = {
    **{f"model.layers.{{i}}.self_attn.{p}_proj.weight": BM for p in "qkvo"},
    **{f"model.layers.{{i}}.mlp.{p}_proj.weight": BM for p in ("gate", "up", "down")},
    "model.layers.{i}.input_layernorm.weight": NORM,
    "model.layers.{i}.post_attention_layernorm.weight": NORM,
}
_LLAMA_TOP = {"model.embed_tokens.weight": EMB, "model.norm.weight": NORM, "lm_head.weight": OUT}

_BERT_LAYER = {
    **_wb("{p}.encoder.layer.{{i}}.attention.self.query", BM),
    **_wb("{p}.encoder.layer.{{i}}.attention.self.key", BM),
    **_wb("{p}.encoder.layer.{{i}}.attention.self.value", BM),
    **_wb("{p}.encoder.layer.{{i}}.attention.output.dense", BM),  # a block matrix, not a readout
    **_wb("{p}.encoder.layer.{{i}}.attention.output.LayerNorm", NORM),
    **_wb("{p}.encoder.layer.{{i}}.intermediate.dense", BM),
    **_wb("{p}.encoder.layer.{{i}}.output.dense", BM),
    **_wb("{p}.encoder.layer.{{i}}.output.LayerNorm", NORM),
}
_BERT_EMB = {
    "{p}.embeddings.word_embeddings.weight": EMB,
    "{p}.embeddings.position_embeddings.weight": POS,
    "{p}.embeddings.token_type_embeddings.weight": EMB,
    **_wb("{p}.embeddings.LayerNorm", NORM),
}


def _fmt(d: dict[str, str], p: str) -> dict[str, str]:
    return {k.format(p=p) if "{p}" in k else k: v for k, v in d.items()}


#: model -> (expected role of every tensor (first name of tied ones), tied names, #block matrices)
EXPECTED: dict[str, tuple[dict[str, str], dict[str, tuple[str, ...]], int]] = {
    "llama": (_expand(_LLAMA_LAYER, _LLAMA_TOP), {}, 14),
    "qwen2": (
        _expand({**_LLAMA_LAYER, **{f"model.layers.{{i}}.self_attn.{p}_proj.bias": BIAS for p in "qkv"}}, _LLAMA_TOP),
        {},
        14,
    ),
    "gpt2": (
        _expand(
            {
                **_wb("transformer.h.{i}.ln_1", NORM),
                **_wb("transformer.h.{i}.attn.c_attn", BM),
                **_wb("transformer.h.{i}.attn.c_proj", BM),
                **_wb("transformer.h.{i}.ln_2", NORM),
                **_wb("transformer.h.{i}.mlp.c_fc", BM),
                **_wb("transformer.h.{i}.mlp.c_proj", BM),
            },
            {"transformer.wte.weight": EMB, "transformer.wpe.weight": POS, **_wb("transformer.ln_f", NORM)},
        ),
        {"transformer.wte.weight": ("transformer.wte.weight", "lm_head.weight")},
        8,
    ),
    "gpt_neox": (
        _expand(
            {
                **_wb("gpt_neox.layers.{i}.input_layernorm", NORM),
                **_wb("gpt_neox.layers.{i}.post_attention_layernorm", NORM),
                **_wb("gpt_neox.layers.{i}.attention.query_key_value", BM),
                **_wb("gpt_neox.layers.{i}.attention.dense", BM),
                **_wb("gpt_neox.layers.{i}.mlp.dense_h_to_4h", BM),
                **_wb("gpt_neox.layers.{i}.mlp.dense_4h_to_h", BM),
            },
            {"gpt_neox.embed_in.weight": EMB, **_wb("gpt_neox.final_layer_norm", NORM), "lm_head.weight": OUT},
        ),
        {},
        8,
    ),
    "bert": (
        _expand(
            _fmt(_BERT_LAYER, "bert"),
            {
                **_fmt(_BERT_EMB, "bert"),
                "cls.predictions.bias": BIAS,
                **_wb("cls.predictions.transform.dense", MAT),
                **_wb("cls.predictions.transform.LayerNorm", NORM),
            },
        ),
        {
            "bert.embeddings.word_embeddings.weight": (
                "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.weight",
            ),
            "cls.predictions.bias": ("cls.predictions.bias", "cls.predictions.decoder.bias"),
        },
        12,
    ),
    "roberta": (
        _expand(
            _fmt(_BERT_LAYER, "roberta"),
            {**_fmt(_BERT_EMB, "roberta"), **_wb("classifier.dense", MAT), **_wb("classifier.out_proj", OUT)},
        ),
        {},
        12,
    ),
    "falcon_h1": (
        _expand(
            {
                **{f"model.layers.{{i}}.feed_forward.{p}_proj.weight": BM for p in ("gate", "up", "down")},
                "model.layers.{i}.mamba.dt_bias": SSM,
                "model.layers.{i}.mamba.A_log": SSM,
                "model.layers.{i}.mamba.D": SSM,
                **_wb("model.layers.{i}.mamba.conv1d", CONV),
                "model.layers.{i}.mamba.in_proj.weight": BM,
                "model.layers.{i}.mamba.out_proj.weight": BM,
                **{f"model.layers.{{i}}.self_attn.{p}_proj.weight": BM for p in "qkvo"},
                "model.layers.{i}.input_layernorm.weight": NORM,
                "model.layers.{i}.pre_ff_layernorm.weight": NORM,
            },
            {"model.embed_tokens.weight": EMB, "model.final_layernorm.weight": NORM, "lm_head.weight": OUT},
        ),
        {},
        18,
    ),
    "mamba2": (
        _expand(
            {
                "backbone.layers.{i}.norm.weight": NORM,
                "backbone.layers.{i}.mixer.dt_bias": SSM,
                "backbone.layers.{i}.mixer.A_log": SSM,
                "backbone.layers.{i}.mixer.D": SSM,
                **_wb("backbone.layers.{i}.mixer.conv1d", CONV),
                "backbone.layers.{i}.mixer.in_proj.weight": BM,
                "backbone.layers.{i}.mixer.norm.weight": NORM,
                "backbone.layers.{i}.mixer.out_proj.weight": BM,
            },
            {"backbone.embeddings.weight": EMB, "backbone.norm_f.weight": NORM, "lm_head.weight": OUT},
        ),
        {},
        4,
    ),
    "lab_llama": (
        _expand(
            {k.replace("model.", "", 1): v for k, v in _LLAMA_LAYER.items()},
            {"embed_tokens.weight": EMB, "norm.weight": NORM, "lm_head.weight": OUT},
        ),
        {},
        14,
    ),
    "hand_mlp": (
        _expand(_wb("hidden.{i}", BM), {**_wb("input", INP), **_wb("norm", NORM), **_wb("classifier", OUT)}),
        {},
        2,
    ),
}
#: the issue's "done when" counts, len(analyze(m).rows) at 2 layers
DONE_WHEN = {"llama": 14, "qwen2": 14, "gpt2": 8, "gpt_neox": 8, "bert": 12, "falcon_h1": 18, "mamba2": 4}


@pytest.fixture(scope="module")
def zoo():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: build() for name, build in _zoo.BUILDERS.items()}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    anatomy_mod._WARNED.clear()
    yield


ZOO = list(_zoo.BUILDERS)


# ------------------------------------------------------------------------------------------------ roles
@pytest.mark.parametrize("name", ZOO)
def test_every_role_by_hand(zoo, name):
    model = zoo[name]
    expected, tied, n_blocks = EXPECTED[name]
    an = lw.anatomy(model)
    assert {r.name: r.role for r in an} == expected
    for first, names in tied.items():
        assert an.by_name(first).names == names and an.by_name(names[-1]) is an.by_name(first)
    assert all(len(r.names) == 1 for r in an if r.name not in tied)
    assert len(an.block_matrices()) == n_blocks
    # blocks are numbered 0, 1; everything named inside layer i says block i
    for r in an:
        assert (r.block is None) == (".0." not in r.name and ".1." not in r.name), r.name
    assert an.unclassified() == []


@pytest.mark.parametrize("name", ZOO)
def test_analyze_finds_exactly_the_block_matrices(zoo, name):
    model = zoo[name]
    expected = {k for k, v in EXPECTED[name][0].items() if v == BM}
    rep = analyze(model)
    assert {r["name"] for r in rep.rows} == expected
    if name in DONE_WHEN:
        assert len(rep.rows) == DONE_WHEN[name]
    # a module and its state dict select the same matrices, with the same alphas
    rep_sd = analyze(model.state_dict())
    assert rep_sd.alphas() == pytest.approx(rep.alphas(), rel=1e-6)
    assert {r["name"]: r["role"] for r in rep_sd.rows} == {r["name"]: r["role"] for r in rep.rows}


def test_state_dict_roles_match_module_roles(zoo):
    for name, model in zoo.items():
        by_module = {r.name: (r.role, r.block, r.fan_in, r.fan_out) for r in lw.anatomy(model)}
        by_sd = {r.name: (r.role, r.block, r.fan_in, r.fan_out) for r in lw.anatomy(model.state_dict())}
        assert by_sd == by_module, name


def test_operators_fans_and_layouts(zoo):
    an = lw.anatomy(zoo["gpt2"])
    c_attn = an.by_name("transformer.h.0.attn.c_attn.weight")  # Conv1D, weight stored (in, out) = (64, 192)
    assert (c_attn.operator, c_attn.fan_in, c_attn.fan_out, c_attn.layout) == ("qkv", 64, 192, "in_out")
    assert (
        an.by_name("transformer.h.1.mlp.c_fc.weight").fan_in,
        an.by_name("transformer.h.1.mlp.c_fc.weight").fan_out,
    ) == (64, 256)
    assert [an.by_name(f"transformer.h.0.{n}.weight").operator for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")] == [
        "o",
        "up",
        "down",
    ]
    wpe = an.by_name("transformer.wpe.weight")
    assert (wpe.role, wpe.operator, wpe.fan_out) == (POS, "position", 64)
    neox = lw.anatomy(zoo["gpt_neox"]).by_name("gpt_neox.layers.0.attention.query_key_value.weight")
    assert (neox.operator, neox.fan_in, neox.fan_out, neox.layout) == ("qkv", 64, 192, "out_in")
    llama = lw.anatomy(zoo["llama"])
    assert (
        llama.by_name("model.layers.0.self_attn.k_proj.weight").fan_in,
        llama.by_name("model.layers.0.self_attn.k_proj.weight").fan_out,
    ) == (64, 32)
    assert [r.operator for r in llama.where(BM, block=1)] == ["q", "k", "v", "o", "gate", "up", "down"]
    bert = lw.anatomy(zoo["bert"])
    assert [r.operator for r in bert.where(BM, block=0)] == ["q", "k", "v", "o", "up", "down"]
    fh = lw.anatomy(zoo["falcon_h1"]).by_name("model.layers.0.mamba.in_proj.weight")
    # hand: intermediate 64, n_groups*d_state 16, heads 4 -> z 64, x 64, B 16, C 16, dt 4
    assert fh.operator == "ssm_in" and fh.parts == (
        ("z", 0, 64),
        ("x", 64, 128),
        ("B", 128, 144),
        ("C", 144, 160),
        ("dt", 160, 164),
    )
    conv = lw.anatomy(zoo["mamba2"]).by_name("backbone.layers.0.mixer.conv1d.weight")
    assert conv.depthwise and conv.vector_like and conv.fan_in == 4
    hand = lw.anatomy(zoo["hand_mlp"])
    assert hand.width == 64 and hand.by_name("input.weight").fan_in == 32


def test_conv1d_alpha_equals_linear_alpha(zoo):
    """α of GPT-2's Conv1D weight (in, out) equals α of the same matrix held by an nn.Linear (out, in), and
    the float64 Hill formula on its singular values."""
    gpt2 = zoo["gpt2"]
    w = gpt2.transformer.h[0].attn.c_attn.weight.detach()  # (64, 192)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(64, 192)
            with torch.no_grad():
                self.c_attn.weight.copy_(w.t())

    twin = nn.Module()
    twin.h = nn.ModuleList([Block(), Block()])
    a_conv = analyze(gpt2).by_name("transformer.h.0.attn.c_attn.weight")["alpha"]
    a_lin = analyze(twin).by_name("h.0.c_attn.weight")["alpha"]
    lam = torch.linalg.svdvals(w.double()).pow(2).sort().values
    i = len(lam) // 2
    ref = 1 + (len(lam) - i) / torch.log(lam[i:] / lam[i]).sum().item()
    assert a_conv == pytest.approx(a_lin, rel=1e-5) and a_conv == pytest.approx(ref, rel=1e-4)


# ------------------------------------------------------------------------------------------ multipliers
def _logits(name, model, inputs):
    with torch.no_grad():
        return _zoo.logits(name, model, inputs).double()


def _perturb(mults, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mults:
            p.copy_(0.5 + torch.rand(p.shape, generator=g))


def _token_embedding(name):
    return {
        "llama": "model.embed_tokens",
        "qwen2": "model.embed_tokens",
        "gpt2": "transformer.wte",
        "gpt_neox": "gpt_neox.embed_in",
        "bert": "bert.embeddings.word_embeddings",
        "roberta": "roberta.embeddings.word_embeddings",
        "falcon_h1": "model.embed_tokens",
        "mamba2": "backbone.embeddings",
        "lab_llama": "embed_tokens",
        "hand_mlp": None,
    }[name]


def _check_merge(name, model, mults):
    inputs = _zoo.example_input(name, model)
    before = _logits(name, model, inputs)
    _perturb(mults)
    scaled = _logits(name, model, inputs)
    assert (scaled - before).abs().max() > 1e-3  # the multipliers are on the forward path
    sd_merged = merge_multipliers_state_dict(model.state_dict())
    merge_multipliers(model)
    merged = _logits(name, model, inputs)
    tol = 1e-5 * max(1.0, scaled.abs().max().item())
    assert (merged - scaled).abs().max() <= tol
    # the pure state-dict merge gives the in-place merge's tensors ...
    after = model.state_dict()
    assert set(sd_merged) == set(after)
    for k, v in sd_merged.items():
        torch.testing.assert_close(v, after[k], rtol=1e-6, atol=1e-7, msg=k)
    # ... and, where the architecture ties no weights (a multiplier on a tied embedding unties it), loads into a
    # plain model of the same architecture with the same logits
    if not EXPECTED[name][1]:
        fresh = _zoo.BUILDERS[name]()
        fresh.load_state_dict(sd_merged)
        assert (_logits(name, fresh, inputs) - scaled).abs().max() <= tol


@pytest.mark.parametrize("name", ZOO)
def test_paper_placement_wraps_block_matrices_and_token_embedding(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _zoo.BUILDERS[name]()
    expected = {k.rsplit(".", 1)[0] for k, v in EXPECTED[name][0].items() if v == BM}
    if _token_embedding(name):
        expected.add(_token_embedding(name))
    mults = add_multipliers(model, kind="rowcol", placement="paper")
    wrapped = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if n.endswith("row_multiplier")}
    assert wrapped == expected
    assert len(mults) == 2 * len(expected)
    _check_merge(name, model, mults)


SYMMETRY_FREE = {  # module -> (row entries, has column multiplier), layer 0 (layer 1 the same), by hand
    "llama": {
        "model.layers.0.self_attn.q_proj": (64, False),
        "model.layers.0.self_attn.o_proj": (64, True),
        "model.layers.0.mlp.gate_proj": (128, False),
        "model.layers.0.mlp.down_proj": (64, True),
    },
    "gpt2": {"transformer.h.0.attn.c_proj": (64, True), "transformer.h.0.mlp.c_proj": (64, True)},
    "falcon_h1": {
        "model.layers.0.self_attn.q_proj": (64, False),
        "model.layers.0.self_attn.o_proj": (64, True),
        "model.layers.0.feed_forward.gate_proj": (128, False),
        "model.layers.0.feed_forward.down_proj": (64, True),
        "model.layers.0.mamba.in_proj": (64 + 4, False),  # z and dt rows only
        "model.layers.0.mamba.out_proj": (64, True),
    },  # no gated RMSNorm: rows + columns
    "mamba2": {
        "backbone.layers.0.mixer.in_proj": (128 + 8, False),
        "backbone.layers.0.mixer.out_proj": (64, False),
    },  # gated RMSNorm scales its columns already
}


@pytest.mark.filterwarnings("ignore:add_multipliers")
@pytest.mark.parametrize("name", list(SYMMETRY_FREE))
def test_symmetry_free_placement(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _zoo.BUILDERS[name]()
    mults = add_multipliers(model, kind="rowcol", placement="symmetry_free")
    params = dict(model.named_parameters())
    got = {}
    for n, p in params.items():
        if n.endswith("row_multiplier") and ".0." in n:
            mod = n.rsplit(".", 1)[0]
            got[mod] = (p.numel(), f"{mod}.col_multiplier" in params)
    assert got == SYMMETRY_FREE[name]
    assert not any(".1." in n and "embed" in n for n in params if "multiplier" in n)
    if name in ("falcon_h1", "mamba2"):
        mod = model.get_submodule(next(m for m in got if m.endswith("in_proj")))
        z, dt = (64, (160, 164)) if name == "falcon_h1" else (128, (288, 296))
        assert mod.row_multiplier_index.tolist() == list(range(z)) + list(range(*dt))
    _check_merge(name, model, mults)


def test_symmetry_free_warns_about_fused_qkv():
    model = _zoo.gpt2()
    with pytest.warns(UserWarning, match="c_attn.weight"):
        add_multipliers(model, placement="symmetry_free")


def test_multipliers_refuse_a_block_matrix_they_cannot_wrap():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(torch.randn(8, 8))  # a raw 2-D parameter: a block matrix, but no Linear

    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    with pytest.raises(ValueError, match=r"layers\.0\.mix"):
        add_multipliers(model)


# ----------------------------------------------------------------------------------- decay and groups
@pytest.mark.parametrize("name", ZOO)
def test_alphadecay_gives_every_block_matrix_its_own_decay(zoo, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _zoo.BUILDERS[name]()
    expected = sorted(k for k, v in EXPECTED[name][0].items() if v == BM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parameters the anatomy cannot classify are reported, not our subject
        opt = torch.optim.AdamW(lw.param_groups(model, lr=1e-3, weight_decay=0.1, per_matrix=True))
    dec = lw.AlphaDecay(opt, model)
    assert sorted(dec.names) == expected
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for n in expected:
        assert len(by_id[id(params[n])]["params"]) == 1, n
    decays = [by_id[id(params[n])]["weight_decay"] for n in expected]
    assert len(set(decays)) > 1  # not one shared value


@pytest.mark.parametrize("name", ZOO)
def test_param_groups_cover_every_parameter_once(zoo, name):
    model = zoo[name]
    rule = lw.WidthScaling(base_width=32, width=64)
    groups = lw.param_groups(model, lr=1e-3, weight_decay=0.1, scaling=rule)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    cls = {n: g["param_class"] for g in groups for n in g["param_names"]}
    want = {
        BM: "matrix",
        MAT: "matrix",
        EMB: "embedding",
        POS: "embedding",
        INP: "embedding",
        OUT: "readout",
        NORM: "vector",
        BIAS: "vector",
        SSM: "vector",
        CONV: "vector",
    }
    assert cls == {n: want[r] for n, r in EXPECTED[name][0].items()}
    lr = {n: g["lr"] for g in groups for n in g["param_names"]}
    for n, r in EXPECTED[name][0].items():
        assert lr[n] == pytest.approx(1e-3 / 2 if r in (BM, MAT) else 1e-3), n


# ----------------------------------------------------------------------------------- unclassified
class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = nn.Parameter(torch.randn(4, 8, 8))  # stacked experts: 3-D, not a conv
        self.temperature = nn.Parameter(torch.ones(1))  # an unknown vector


def _odd_model():
    m = nn.Module()
    m.layers = nn.ModuleList([_OddBlock(), _OddBlock()])
    return m


def test_unclassified_is_reported_never_defaulted():
    model = _odd_model()
    an = lw.anatomy(model)
    assert [r.name for r in an.unclassified()] == [
        "layers.0.experts",
        "layers.0.temperature",
        "layers.1.experts",
        "layers.1.temperature",
    ]
    with pytest.raises(ValueError, match=r"layers\.0\.experts.*rules=") as exc:
        lw.param_groups(model, lr=1e-3, weight_decay=0.1, scaling=lw.WidthScaling(8, 8))
    assert "layers.1.temperature" in str(exc.value)
    groups = lw.param_groups(
        model,
        lr=1e-3,
        weight_decay=0.1,
        scaling=lw.WidthScaling(8, 8),
        rules=[(r"experts$", "matrix"), (r"temperature$", "vector")],
    )
    assert sum(len(g["params"]) for g in groups) == 8
    with pytest.warns(UserWarning, match=r"layers\.0\.experts \[4, 8, 8\]"):
        rep = analyze(model)
    assert [r["name"] for r in rep.rows] == ["layers.0.proj.weight", "layers.1.proj.weight"]
    with pytest.warns(UserWarning, match="temperature"):
        rules = [(r"experts$", "matrix"), (r"temperature$", "vector")]
        groups = lw.param_groups(model, lr=1e-3, weight_decay=0.1, rules=rules, per_matrix=True)
        lw.AlphaDecay(torch.optim.AdamW(groups), model)
    with pytest.warns(UserWarning, match="treated by shape"):
        lw.param_groups(model, lr=1e-3, weight_decay=0.1)


# ------------------------------------------------------------------------------------------- API, CLI
def test_api_lookups_and_printer(zoo):
    model = zoo["gpt2"]
    an = lw.anatomy(model)
    assert an.of(model.lm_head.weight) is an.by_name("lm_head.weight") is an.by_name("module.transformer.wte.weight")
    with pytest.raises(KeyError, match="nope"):
        an.by_name("nope")
    with pytest.raises(ValueError, match="unknown role"):
        an.where("matrixx")
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        lw.anatomy([1, 2])
    md = an.to_markdown()
    assert "| transformer.h.0.attn.c_attn.weight | 64x192 | block_matrix | 0 | qkv | 64 | 192 | in_out |" in md
    assert "8 block matrices" in md and "0 unclassified" in md
    s = an.summary()
    assert (s["block_matrices"], s["unclassified"], s["tensors"]) == (8, 0, 28)
    blocks = an.blocks()
    assert [(b.name, b.attention, b.mlp, b.attention_norm, b.mlp_norm) for b in blocks][0] == (
        "transformer.h.0",
        "transformer.h.0.attn",
        "transformer.h.0.mlp",
        "transformer.h.0.ln_1",
        "transformer.h.0.ln_2",
    )


def test_cli_on_hf_folder_safetensors_and_pt(zoo, tmp_path, capsys):
    from safetensors.torch import save_file

    from layerwise.lab.cli import main

    zoo["falcon_h1"].config.save_pretrained(tmp_path / "fh1")
    assert main(["anatomy", str(tmp_path / "fh1"), "--json", str(tmp_path / "fh1.json"), "--strict"]) == 0
    out = capsys.readouterr().out
    assert "meta device" in out and "| model.layers.1.mamba.A_log | 4 | ssm_vector | 1 |" in out
    assert "18 block matrices" in out and (tmp_path / "fh1.json").exists()
    sd = {k: v.contiguous() for k, v in zoo["gpt2"].state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "gpt2.safetensors"))
    assert main(["anatomy", str(tmp_path / "gpt2.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "| transformer.h.0.attn.c_attn.weight | 64x192 | block_matrix | 0 | qkv | 64 | 192 | in_out |" in out
    torch.save({"model": zoo["hand_mlp"].state_dict()}, tmp_path / "mlp.pt")
    assert main(["anatomy", str(tmp_path / "mlp.pt")]) == 0
    assert "| input.weight | 64x32 | input |" in capsys.readouterr().out
    assert main(["anatomy", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["anatomy", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_wrapped_models_keep_their_anatomy_and_conv1d_impls_agree():
    ref = _zoo.gpt2()
    inputs = _zoo.example_input("gpt2", ref)
    outs = []
    for impl in ("materialize", "io"):
        model = _zoo.gpt2()
        mults = add_multipliers(model, impl=impl)
        _perturb(mults)
        outs.append(_logits("gpt2", model, inputs))
        an = lw.anatomy(model)
        c_attn = an.by_name("transformer.h.0.attn.c_attn.weight")
        assert (c_attn.role, c_attn.layout, c_attn.fan_in, c_attn.fan_out) == (BM, "in_out", 64, 192)
        row = an.by_name("transformer.h.0.attn.c_attn.row_multiplier")
        assert (row.role, row.block, row.operator, row.shape) == ("multiplier", 0, "qkv", (192,))
        assert an.by_name("transformer.h.0.attn.c_attn.col_multiplier").shape == (64,)
        assert len(analyze(model).rows) == 8
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_wrapper_prefixes_do_not_change_the_anatomy(zoo):
    """A DDP-style ``module.`` wrapper: same canonical names, roles, Mamba parts, and the diagnostics still
    find the sub-modules."""
    model = zoo["falcon_h1"]
    wrapper = nn.Module()
    wrapper.module = model
    plain, wrapped = lw.anatomy(model), lw.anatomy(wrapper)
    assert [(r.name, r.role, r.parts) for r in wrapped] == [(r.name, r.role, r.parts) for r in plain]
    assert wrapped.module("model.layers.0.mamba") is model.model.layers[0].mamba
    svs = lw.scaling.block_top_singular_values(wrapper, k=1)
    assert set(svs) == {r.name for r in plain.block_matrices()}
    blocks = lw.scaling.transformer_blocks(wrapper)
    assert blocks[1].attn is model.model.layers[1].self_attn and blocks[1].mlp is model.model.layers[1].feed_forward


def test_block_membership_decides_before_module_names():
    """A block Linear named like a readout (``output``, ``head``) is a block matrix, for the module and for its
    state dict alike; outside the blocks the same name is the readout."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.output = nn.Linear(16, 16)
            self.head = nn.Linear(16, 16)

    model = nn.Module()
    model.embed_tokens = nn.Embedding(32, 16)
    model.layers = nn.ModuleList([Block(), Block()])
    model.output = nn.Linear(16, 32)
    want = ["layers.0.output.weight", "layers.0.head.weight", "layers.1.output.weight", "layers.1.head.weight"]
    assert [r["name"] for r in analyze(model).rows] == want
    assert sorted(r["name"] for r in analyze(model.state_dict()).rows) == sorted(want)
    assert lw.anatomy(model).by_name("output.weight").role == OUT
    assert lw.anatomy(model.state_dict()).by_name("output.weight").role == OUT


def test_from_path_safetensors_headers_keep_shapes_and_dtypes(tmp_path):
    from safetensors.torch import save_file

    from layerwise._safetensors import DTYPES
    from layerwise.anatomy import from_path

    sd = {
        "a": torch.zeros(3, 4, dtype=torch.bfloat16),
        "b": torch.zeros(5, dtype=torch.int64),
        "c": torch.zeros(2, 2, dtype=torch.float8_e4m3fn),
    }
    save_file(sd, str(tmp_path / "w.safetensors"))
    got, _ = from_path(tmp_path / "w.safetensors")
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in got.items()} == {
        k: (tuple(v.shape), v.dtype, "meta") for k, v in sd.items()
    }
    assert DTYPES["F8_E4M3"] is torch.float8_e4m3fn
    # an unknown dtype is an error naming the file and the tensor, never a silent float32
    raw = (tmp_path / "w.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    bad = raw[8 : 8 + n].replace(b'"I64"', b'"Q64"')
    (tmp_path / "bad.safetensors").write_bytes(raw[:8] + bad + raw[8 + n :])
    with pytest.raises(ValueError, match=r"anatomy: .*bad.safetensors.*'b'.*Q64"):
        from_path(tmp_path / "bad.safetensors")
