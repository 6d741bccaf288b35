"""WidthScaling.apply_ / fold_: the model-side half of μP on Hugging Face and hand-written models, and the
coordinate check that shows it working on HF LLaMA."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tests._zoo import HandMLP, build, hf_llama, llama_config
from tests.scaling.test_from_models import seq_net
from torch import nn

import layerwise as lw
from layerwise.scaling import WidthScaling, coord_check

transformers = pytest.importorskip("transformers")


IDS = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(0))


def _mup_llama(hidden, inter, base_hidden=32, base_inter=64, seed=0, **kw):
    model = hf_llama(hidden, inter, seed=seed, **kw)
    rule = WidthScaling.from_models(model, base=hf_llama(base_hidden, base_inter, meta=True, **kw))
    return model, rule


def _clone(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -------------------------------------------------------------------------------------------- init
def test_apply_rescales_matrix_init_by_inverse_sqrt_fan_in_multiplier():
    """q/k/v/o/gate/up × 1/2 (m = 4), down_proj × 1/√8 (its FFN fan-in grows 8×); embedding, head, norms
    unchanged — exactly (a multiplication of the model's own init)."""
    model, rule = _mup_llama(128, 512)
    before = _clone(model)
    report = rule.apply_(model)
    after = dict(model.named_parameters())
    for name, p in after.items():
        if ".mlp.down_proj." in name:
            f = 8**-0.5
        elif "_proj." in name:
            f = 0.5
        else:
            f = 1.0
        torch.testing.assert_close(p.detach(), before[name] * f, rtol=0, atol=0), name
        if f != 1.0:
            assert report["init"][name] == f
            assert p.detach().std().item() == pytest.approx(before[name].std().item() * f, rel=1e-6)


def test_apply_readout_lr_rescales_head_init_and_attaches_no_hook():
    model = hf_llama(128, 256)
    rule = WidthScaling.from_models(model, base=hf_llama(32, 64, meta=True), readout="lr")
    before = model.lm_head.weight.detach().clone()
    report = rule.apply_(model)
    torch.testing.assert_close(model.lm_head.weight.detach(), before / 4, rtol=0, atol=0)
    assert report["readout"] == {} and not model.lm_head._forward_pre_hooks


def test_apply_fan_in_init_mode_on_default_torch_init():
    """A net with PyTorch's default init (std ∝ 1/sqrt(fan_in)): matrices already μP (unchanged), the
    output layer × √m (as mup's MuReadout rescale), biases of layers whose fan-in grows × √m."""
    torch.manual_seed(0)
    model = seq_net(64)
    with torch.device("meta"):
        base = seq_net(16)
    rule = WidthScaling.from_models(model, base=base)
    before = _clone(model)
    rule.apply_(model, init="fan_in")
    expect = {"0.weight": 1, "0.bias": 1, "2.weight": 1, "2.bias": 2, "4.weight": 2, "4.bias": 2}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * expect[name], rtol=0, atol=0), name


# ------------------------------------------------------------------------------- readout multiplier
def test_logits_scale_as_mup_expects():
    """The hook multiplies the head's input by 1/m exactly; at init, the logits' RMS falls as width^-1/2
    under μP (the head's std is width-independent, its input multiplied by 1/m) and grows as width^+1/2 under
    SP (a fixed std over a growing fan-in)."""
    model, rule = _mup_llama(128, 256)
    rule.apply_(model)
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
        h = out.hidden_states[-1]  # after the final norm
        torch.testing.assert_close(out.logits, (h @ model.lm_head.weight.T) / 4, rtol=1e-6, atol=1e-7)
    ids = torch.randint(64, (8, 32), generator=torch.Generator().manual_seed(1))
    widths = (32, 64, 128, 256, 512)
    rms = {"mup": [], "sp": []}
    for w in widths:
        for par in rms:
            model, rule = _mup_llama(w, 2 * w, seed=w)
            if par == "mup":
                rule.apply_(model)
            with torch.no_grad():
                rms[par].append(model(ids).logits.double().pow(2).mean().sqrt().item())
    xs = [math.log2(w) for w in widths]
    for par, want in (("mup", -0.5), ("sp", 0.5)):
        ys = [math.log2(r) for r in rms[par]]
        xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sum((x - xm) ** 2 for x in xs)
        assert slope == pytest.approx(want, abs=0.1), (par, rms[par])


def test_tied_head_gets_the_multiplier_on_the_output_only():
    model = hf_llama(128, 256, tie=True)
    rule = WidthScaling.from_models(model, base=hf_llama(32, 64, tie=True, meta=True))
    emb_before = model.model.embed_tokens.weight.detach().clone()
    report = rule.apply_(model)
    assert report["readout"] == {"lm_head": 0.25}
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), emb_before, rtol=0, atol=0)  # no init change
    with torch.no_grad():
        torch.testing.assert_close(model.model.embed_tokens(IDS), emb_before[IDS], rtol=0, atol=0)
        out = model(IDS, output_hidden_states=True)
        torch.testing.assert_close(out.logits, out.hidden_states[-1] @ emb_before.T / 4, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="tied"):
        rule.fold_(model)


def test_gpt2_tied_conv1d_and_attention_scale():
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(d, meta=False, tie=True):
        cfg = GPT2Config(
            vocab_size=64,
            n_embd=d,
            n_layer=2,
            n_head=4,
            n_positions=32,
            scale_attn_by_inverse_layer_idx=True,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=tie,
        )
        return build(GPT2LMHeadModel, cfg, meta=meta)

    model = gpt2(128)
    rule = WidthScaling.from_models(model, base=gpt2(32, meta=True))
    classes = {t.name: t.param_class for t in rule.tensors}
    assert classes["transformer.h.0.attn.c_attn.weight"] == "matrix"  # Conv1D (in, out), both grow
    assert classes["transformer.wpe.weight"] == "embedding"
    assert rule.tensor("transformer.h.0.mlp.c_proj.weight").m_in == 4.0  # fan-in = 4·n_embd, read as (in, out)
    scales = [blk.attn.scaling for blk in model.transformer.h]
    report = rule.apply_(model)
    assert report["readout"] == {"lm_head": 0.25}
    for blk, s in zip(model.transformer.h, scales):  # head size 8 -> 32: × sqrt(8/32), 1/(layer+1) kept
        assert blk.attn.scaling == pytest.approx(s * 0.5, rel=1e-15)
    with pytest.raises(ValueError, match="tied"):
        rule.fold_(model)
    untied = gpt2(128, tie=False)
    rule = WidthScaling.from_models(untied, base=gpt2(32, meta=True, tie=False))
    rule.apply_(untied)
    with pytest.raises(ValueError, match="fused qkv"):
        rule.fold_(untied)
    assert untied.lm_head._forward_pre_hooks  # nothing folded


def test_falcon_h1_multipliers_in_its_config():
    from transformers import FalconH1Config, FalconH1ForCausalLM

    def falcon(d, meta=False):
        cfg = FalconH1Config(
            vocab_size=64,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=d // 4,
            max_position_embeddings=32,
            mamba_d_ssm=d,
            mamba_n_heads=4,
            mamba_d_head=d // 4,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_d_conv=4,
            mamba_expand=1,
            mamba_chunk_size=16,
            tie_word_embeddings=False,
            lm_head_multiplier=0.5,
            key_multiplier=1.5,
        )
        return build(FalconH1ForCausalLM, cfg, meta=meta)

    model = falcon(64)
    rule = WidthScaling.from_models(model, base=falcon(32, meta=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything was done: no warning
        report = rule.apply_(model)
    assert report["readout"] == {} and not model.lm_head._forward_pre_hooks
    assert report["config"] == {"lm_head_multiplier": 0.5, "key_multiplier": pytest.approx(math.sqrt(0.5))}
    assert model.config.lm_head_multiplier == 0.25 and model.model.lm_head_multiplier == 0.25
    assert model.config.key_multiplier == pytest.approx(1.5 * math.sqrt(0.5), rel=1e-15)
    assert model.model.layers[0].self_attn.key_multiplier == pytest.approx(1.5 * math.sqrt(0.5), rel=1e-15)


# ------------------------------------------------------------------------------ attention, warnings
def test_attention_scale_on_hf_llama():
    """Head size 8 -> 32 (4 heads): scaling = sqrt(8)/32 (μP's 1/head_dim with the base-matched constant);
    more heads of the same size: unchanged."""
    model, rule = _mup_llama(128, 256)
    rule.apply_(model)
    for layer in model.model.layers:
        assert layer.self_attn.scaling == pytest.approx(math.sqrt(8) / 32, rel=1e-15)
    model = hf_llama(128, 256, heads=16)
    rule = WidthScaling.from_models(model, base=hf_llama(32, 64, heads=4, meta=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rule.apply_(model)["attention"] == {}
    assert model.model.layers[0].self_attn.scaling == 8**-0.5


def test_one_warning_when_the_model_exposes_no_attention_scale():
    from layerwise.lab.model import build_model

    def ref(d, device=None):
        with torch.device(device or "cpu"):
            return build_model("nano", vocab_size=64, hidden_size=d, intermediate_size=2 * d, num_heads=4)

    model = ref(128)
    rule = WidthScaling.from_models(model, base=ref(32, "meta"))
    with pytest.warns(UserWarning, match=r"attention scale of layers\.0\.self_attn .*no 'scaling'") as rec:
        rule.apply_(model)
    assert len(rec) == 1 and "layers.1.self_attn" in str(rec[0].message)
    # the global rule does not know the base head size: said once, too
    model = hf_llama(64, 128)
    with pytest.warns(UserWarning, match="does not know the base model's head size") as rec:
        WidthScaling(32, 64).apply_(model)
    assert len(rec) == 1


def test_apply_twice_raises_and_through_wrappers():
    model, rule = _mup_llama(64, 128)
    rule.apply_(torch.compile(model))  # the bare model underneath is changed and marked
    assert model.lm_head._forward_pre_hooks
    with pytest.raises(RuntimeError, match="already called"):
        rule.apply_(model)
    with pytest.raises(RuntimeError, match="already called"):
        rule.apply_(torch.compile(model))
    with pytest.raises(ValueError, match="init must be"):
        rule.apply_(hf_llama(64, 128), init="xavier")
    with pytest.raises(ValueError, match="has shape"):
        rule.apply_(hf_llama(128, 256))


def test_apply_error_leaves_the_model_untouched():
    """An output-like weight without a linear module to hook: an error naming it, and nothing changed."""

    class RawHead(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.hidden = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
            self.w_out = nn.Parameter(torch.randn(3, d))

    model = RawHead(64)
    with torch.device("meta"):
        base = RawHead(16)
    rule = WidthScaling.from_models(model, base=base)
    assert rule.tensor("w_out").param_class == "readout"
    before = _clone(model)
    with pytest.raises(ValueError, match=r"'w_out' is not held by a linear"):
        rule.apply_(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -------------------------------------------------------------------------------------------- fold
def test_fold_gives_a_plain_checkpoint_with_the_same_function():
    """After fold_, a fresh HF model (no apply_) loading the state dict computes the same logits: the
    readout multiplier and the attention scale travel inside the weights."""
    model, rule = _mup_llama(128, 256)
    rule.apply_(model)
    with torch.no_grad():
        ref = model(IDS).logits
    report = rule.fold_(model)
    assert report["readout"] == {"lm_head": 0.25} and set(report["attention"]) == {
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
    }
    assert not model.lm_head._forward_pre_hooks
    assert model.model.layers[0].self_attn.scaling == pytest.approx(32**-0.5, rel=1e-15)
    plain = transformers.LlamaForCausalLM(llama_config(128, 256))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain(IDS).logits, ref, rtol=1e-5, atol=1e-6)
    assert rule.fold_(model)["readout"] == {}  # a second fold does nothing
    with pytest.raises(ValueError, match="apply_ was not called"):
        rule.fold_(hf_llama(128, 256))


def test_resume_recipe_apply_keep_then_load():
    """To continue training from a checkpoint: build, apply_(init="keep"), load: the same function."""
    model, rule = _mup_llama(64, 128)
    rule.apply_(model)
    sd = model.state_dict()
    fresh = hf_llama(64, 128, seed=5)
    before = _clone(fresh)
    rule.apply_(fresh, init="keep")
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- coordinate check
def _hf_builder(mup: bool, base=32):
    def build(w):
        model = hf_llama(w, 2 * w)
        if not mup:
            return model
        rule = WidthScaling.from_models(model, base=hf_llama(base, 2 * base, meta=True))
        rule.apply_(model)
        return model, rule

    return build


@pytest.mark.parametrize("fix_data", [False, True])
def test_coord_check_hf_llama_mup_flat_sp_grows(fix_data):
    """μP (from_models + apply_) on transformers' LlamaForCausalLM: every site's slope of log RMS vs log width
    within ±0.5 after the first update; SP (the same models, no rule) grows.  Before any update the logits
    fall as width^-1/2 by design (μP's output layer: a width-independent weight std over a 1/m input)."""
    widths = [32, 64, 128, 256]
    kw = dict(steps=3, lr=1e-2, batch_size=4, seq_len=16, fix_data=fix_data)
    mup = coord_check(widths, _hf_builder(True), **kw)
    sp = coord_check(widths, _hf_builder(False), **kw)
    assert mup.meta["parametrization"] == "rules from build_fn"
    assert set(mup.rms) == {"embedding", "attn", "mlp", "residual", "logits"}
    for site in mup.rms:
        for t in range(3):
            if (site, t) == ("logits", 0):
                assert mup.slope(site, t) == pytest.approx(-0.5, abs=0.1)
            else:
                assert abs(mup.slope(site, t)) <= 0.5, (site, t, mup.slope(site, t))
    for site in ("attn", "mlp", "residual"):
        assert sp.slope(site, 2) > 1.0, site
    assert sp.slope("logits", 2) > 0.5


def test_coord_check_without_an_embedding():
    """A hand-written classifier: inputs from input_shape (features, class targets) or batch_fn; sites
    embedding (its input layer), hidden, logits."""

    def build(w):
        model = HandMLP(d_in=10, width=w, n_classes=3)
        with torch.device("meta"):
            base = HandMLP(d_in=10, width=16, n_classes=3)
        rule = WidthScaling.from_models(model, base=base)
        rule.apply_(model, init="fan_in")
        return model, rule

    res = coord_check([16, 32, 64], build, steps=2, input_shape=(10,), batch_size=8)
    assert set(res.rms) == {"embedding", "hidden", "logits"}
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))
    y = torch.randint(3, (8,), generator=torch.Generator().manual_seed(4))
    res2 = coord_check([16, 32], build, steps=2, batch_fn=lambda t: (x, y))
    assert res2.loss[16][0] == pytest.approx(
        torch.nn.functional.cross_entropy(_seeded(build, 16)(x), y).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="input_shape or batch_fn"):
        coord_check([16], build, input_shape=(10,), batch_fn=lambda t: (x, y))
    with pytest.raises(ValueError, match="vocab_size"):
        coord_check([16], build)


def _seeded(build, w):
    torch.manual_seed(0)
    return build(w)[0]


def test_exports():
    assert lw.scaling.TensorScaling is lw.scaling.shapes.TensorScaling
    assert "unscaled" in lw.scaling.PARAM_CLASSES
    assert lw.scaling.WD_CONVENTIONS == ("coupled", "independent")


def test_global_rule_apply_on_a_hand_written_net():
    """The shortcut rule on the zoo's classifier (anatomy: input layer, hidden blocks, classifier): hidden
    matrices × m^-1/2 (constant init) and nothing on the input layer (its fan-in is fixed); under "fan_in" the
    classifier × √m and the hidden biases × √m, the input layer and its bias untouched."""
    for init, expect in (
        ("constant", {"hidden.0.weight": 0.5, "hidden.1.weight": 0.5}),
        ("fan_in", {"classifier.weight": 2.0, "hidden.0.bias": 2.0, "hidden.1.bias": 2.0, "classifier.bias": 2.0}),
    ):
        torch.manual_seed(0)
        model = HandMLP(d_in=10, width=64, n_classes=3)
        before = _clone(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no attention: nothing left undone
            report = WidthScaling(16, 64).apply_(model, init=init)
        assert report["init"] == expect and report["readout"] == {"classifier": 0.25}
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[name] * expect.get(name, 1.0), rtol=0, atol=0)


def test_bert_attention_scale_sits_in_a_sub_module():
    """BERT's q/k/v sit in ``attention.self`` (which holds ``scaling`` and the head size), ``o`` in
    ``attention.output``: the scale is found below the attention sub-layer."""
    from transformers import BertConfig, BertForMaskedLM

    def bert(d, meta=False):
        cfg = BertConfig(
            vocab_size=64, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2, num_attention_heads=4
        )
        return build(BertForMaskedLM, cfg, meta=meta)

    model = bert(128)
    rule = WidthScaling.from_models(model, base=bert(32, meta=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = rule.apply_(model)
    assert set(report["attention"]) == {f"bert.encoder.layer.{i}.attention" for i in range(2)}
    assert model.bert.encoder.layer[0].attention.self.scaling == pytest.approx(math.sqrt(8) / 32, rel=1e-15)
    assert report["readout"] == {"cls.predictions.decoder": 0.25}  # tied to the word embeddings


class _HiddenAttention(nn.Module):
    """Attention that layerwise.anatomy does not recognise (to_q/to_k/... names), with a head_dim attribute."""

    def __init__(self, d: int, heads: int = 4) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.to_out(self.to_v(x))


class _HiddenAttentionNet(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.layers = nn.ModuleList([_HiddenAttention(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.lm_head(h)


def test_growing_heads_in_unrecognised_attention_are_named_in_a_warning():
    with torch.device("meta"):
        base = _HiddenAttentionNet(16)
    with pytest.warns(UserWarning, match=r"does not recognise as attention.*layers\.0 \(4 -> 16\)"):
        rule = WidthScaling.from_models(_HiddenAttentionNet(64), base=base)
    assert rule.attention == ()
    with warnings.catch_warnings():  # the same width without head growth: nothing to say
        warnings.simplefilter("error")
        WidthScaling.from_models(_HiddenAttentionNet(64), base=_HiddenAttentionNet(64).to("meta"))
