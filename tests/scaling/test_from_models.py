"""WidthScaling.from_models: per-tensor classes and factors from shapes, canonical names under wrappers, the
weight-decay conventions against the update formula, and mup's MuAdamW as an external oracle."""

from __future__ import annotations

import math

import pytest
import torch
from tests._zoo import HandMLP, hf_llama
from torch import nn

import layerwise as lw
from layerwise.optim.groups import param_groups
from layerwise.scaling import WidthScaling

LR, WD = 1e-3, 0.1
QKVO = ("q", "k", "v", "o")


def seq_net(width, d_in=10, n_out=3):
    """The issue's custom net, as a bare nn.Sequential (no names for the anatomy to go on)."""
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_out))


def lr_wd(groups):
    return {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}


# ------------------------------------------------------------------------------ the done-when
@pytest.mark.parametrize("readout", ["multiplier", "lr"])
def test_llama_widened_4x(readout):
    """LlamaForCausalLM 32 -> 128 (FFN 64 -> 256), base on the meta device: lr × 1/4 on q/k/v/o/gate/up/down,
    the embedding unscaled, the head per the readout rule, λ × 2 on matrices at wd_exponent 0.5."""
    model, base = hf_llama(128, 256), hf_llama(32, 64, meta=True)
    rule = WidthScaling.from_models(model, base=base, wd_exponent=0.5, readout=readout)
    assert (rule.base_width, rule.width, rule.per_tensor) == (32, 128, True)
    rows = {r["name"]: r for r in rule.tensor_table()}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert (q["shape"], q["base_shape"], q["param_class"], q["m_in"]) == ([128, 128], [32, 32], "matrix", 4.0)
    assert (q["lr_mult"], q["wd_mult"], q["init_mult"]) == (0.25, 2.0, 0.5)
    assert rule.table()["matrix"]["lr_mult"] == 0.25 and WidthScaling(32, 128).tensor_table() == []
    got = lr_wd(param_groups(model, LR, WD, rule))
    for i in range(2):
        for op in QKVO:
            assert got[f"model.layers.{i}.self_attn.{op}_proj.weight"] == (LR / 4, WD * 2), op
        for op in ("gate", "up", "down"):
            assert got[f"model.layers.{i}.mlp.{op}_proj.weight"] == (LR / 4, WD * 2), op
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert got[f"model.layers.{i}.{norm}.weight"] == (LR, 0.0)
    assert got["model.embed_tokens.weight"] == (LR, WD)
    assert got["lm_head.weight"] == ((LR, WD) if readout == "multiplier" else (LR / 4, WD))
    assert rule.tensor("lm_head.weight").param_class == "readout"
    assert rule.tensor("model.embed_tokens.weight").param_class == "embedding"


def test_down_proj_uses_its_own_fan_in_multiplier():
    """The FFN grows 8× while the hidden size grows 4×: down_proj's fan-in is the FFN size (lr × 1/8,
    λ × √8); gate/up read the hidden size (lr × 1/4, λ × 2).  The global rule cannot say this."""
    model, base = hf_llama(128, 512), hf_llama(32, 64, meta=True)
    rule = WidthScaling.from_models(model, base=base)
    got = lr_wd(param_groups(model, LR, WD, rule))
    down = rule.tensor("model.layers.0.mlp.down_proj.weight")
    assert (down.m_in, down.m_out) == (8.0, 4.0)
    assert got["model.layers.0.mlp.down_proj.weight"] == (LR / 8, pytest.approx(WD * math.sqrt(8), rel=1e-15))
    assert got["model.layers.0.mlp.up_proj.weight"] == (LR / 4, WD * 2)
    assert rule.init_mult("matrix", "model.layers.1.mlp.down_proj.weight") == pytest.approx(8**-0.5, rel=1e-15)


@pytest.mark.parametrize("build", [seq_net, lambda w: HandMLP(d_in=10, width=w, n_classes=3)])
def test_custom_net_classes(build):
    """Linear(10, d) -> hidden -> Linear(d, 3): the input layer is input-like (its fan-in is fixed), the last
    layer output-like, hidden layers matrix-like, biases and norms vector-like — from shapes, even where the
    anatomy has no names to go on (nn.Sequential)."""
    model = build(64)
    with torch.device("meta"):
        base = build(16)
    rule = WidthScaling.from_models(model, base=base)
    classes = {t.name: t.param_class for t in rule.tensors}
    first, last = ("0", "4") if isinstance(model, nn.Sequential) else ("input", "classifier")
    assert classes[f"{first}.weight"] == "embedding"
    assert classes[f"{last}.weight"] == "readout"
    assert all(c == "vector" for n, c in classes.items() if n.endswith("bias") or n.startswith("norm"))
    hidden = [n for n in classes if n.endswith("weight") and n.split(".")[0] not in (first, last, "norm")]
    assert hidden and all(classes[n] == "matrix" for n in hidden)
    got = lr_wd(param_groups(model, LR, WD, rule))
    assert got[f"{first}.weight"] == (LR, WD)
    assert got[f"{last}.weight"] == (LR, WD)
    assert all(got[n] == (LR / 4, WD * 2) for n in hidden)
    assert (rule.base_width, rule.width) == (16, 64)


# ------------------------------------------------------------------------------ delta, identity, errors
def test_delta_decides_which_dims_scale():
    """With a delta, the model may sit at the base width (every factor exactly 1, classes still known), and a
    dimension that the delta leaves alone must not change."""
    base = hf_llama(32, 64, meta=True)
    delta = hf_llama(64, 128, meta=True)
    same = hf_llama(32, 64)
    rule = WidthScaling.from_models(same, base=base, delta=delta)
    assert rule.tensor("model.layers.0.self_attn.q_proj.weight").param_class == "matrix"
    assert rule.tensor("lm_head.weight").param_class == "readout"
    ref = param_groups(same, LR, WD)
    got = param_groups(same, LR, WD, rule)
    assert lr_wd(got) == lr_wd(ref)
    # without a delta, nothing differs between base and model: nothing is a width dimension
    flat = WidthScaling.from_models(same, base=base)
    assert {t.param_class for t in flat.tensors} == {"unscaled", "vector"}
    assert lr_wd(param_groups(same, LR, WD, flat)) == {
        n: (LR, 0.0 if p.ndim < 2 else WD) for n, p in same.named_parameters()
    }
    # the vocabulary changed between base and model, but the delta says it is not a width dimension
    with pytest.raises(ValueError, match=r"dimension 0 of model\.embed_tokens\.weight .*delta"):
        WidthScaling.from_models(hf_llama(64, 128, vocab=96), base=base, delta=delta)


def test_from_models_errors():
    base = hf_llama(32, 64, meta=True)
    with pytest.raises(
        ValueError, match=r"shrinks .*model\.embed_tokens\.weight|model\.embed_tokens\.weight.* shrinks"
    ):
        WidthScaling.from_models(base, base=hf_llama(64, 128, meta=True))
    with pytest.raises(ValueError, match=r"missing in the base: .*q_proj\.bias"):
        WidthScaling.from_models(_with_bias(64), base=base)
    with pytest.raises(ValueError, match="different number of dimensions"):
        WidthScaling.from_models({"w": torch.zeros(4, 4)}, base={"w": torch.zeros(4)})
    with pytest.raises(TypeError, match="reads"):
        WidthScaling.from_models(base, base=base, width=64)
    with pytest.raises(TypeError, match="base must be"):
        WidthScaling.from_models(base, base=[1, 2])


def _with_bias(hidden):
    return hf_llama(hidden, 2 * hidden, attention_bias=True, meta=True)


def test_tied_head_with_lr_readout_is_an_error():
    model, base = hf_llama(64, 128, tie=True), hf_llama(32, 64, tie=True, meta=True)
    rule = WidthScaling.from_models(model, base=base)  # multiplier: fine; the tied tensor is input-like
    assert rule.tensor("lm_head.weight") is rule.tensor("model.embed_tokens.weight")
    assert rule.tensor("lm_head.weight").param_class == "embedding"
    with pytest.raises(ValueError, match="tied"):
        WidthScaling.from_models(model, base=base, readout="lr")


def test_param_groups_check_the_rule_against_the_model():
    model, base = hf_llama(64, 128), hf_llama(32, 64, meta=True)
    rule = WidthScaling.from_models(model, base=base)
    with pytest.raises(
        ValueError, match=r"embed_tokens\.weight.* has shape \[64, 128\] but the rule was built for \[64, 64\]"
    ):
        param_groups(hf_llama(128, 256), LR, WD, rule)
    # multipliers added after the rule was built are vector-like: accepted, factors 1
    lw.add_multipliers(model)
    got = param_groups(model, LR, WD, rule, multiplier_weight_decay=2e-3)
    by = {n: g for g in got for n in g["param_names"]}
    assert by["model.layers.0.self_attn.q_proj.row_multiplier"]["lr"] == LR
    assert by["model.layers.0.self_attn.q_proj.weight"]["lr"] == LR / 2
    # a matrix the rule does not know is an error naming it
    model.extra = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"'extra\.weight' .*not in this per-tensor rule"):
        param_groups(model, LR, WD, rule)


def test_global_rule_is_the_per_tensor_rule_when_everything_grows_together():
    model, base = hf_llama(128, 256), hf_llama(32, 64, meta=True)
    for wd_exponent in (0.0, 0.5, 1.0):
        per = lr_wd(param_groups(model, LR, WD, WidthScaling.from_models(model, base=base, wd_exponent=wd_exponent)))
        glob = lr_wd(param_groups(model, LR, WD, WidthScaling(32, 128, wd_exponent=wd_exponent)))
        assert per == glob


# ---------------------------------------------------------------------------------- canonical names
def test_rule_survives_compile_and_ddp_prefixes():
    model, base = hf_llama(64, 128), hf_llama(32, 64, meta=True)
    rule = WidthScaling.from_models(model, base=base)
    ref = lr_wd(param_groups(model, LR, WD, rule))
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    assert lr_wd(param_groups(compiled, LR, WD, rule)) == ref
    ddp_named = [(f"module.{n}", p) for n, p in model.named_parameters()]
    assert lr_wd(param_groups(ddp_named, LR, WD, rule)) == ref
    # and the rule can be built from the wrapped model too
    assert lr_wd(param_groups(model, LR, WD, WidthScaling.from_models(compiled, base=base))) == ref


# ------------------------------------------------------------------------------ weight-decay conventions
def _zero_grad_steps(model, groups, lr_factors):
    """AdamW steps with zero gradients (the Adam update is exactly 0): only the decay moves the weights."""
    opt = torch.optim.AdamW(groups, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factors[s])
    for _ in range(len(lr_factors) - 1):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()


@pytest.mark.parametrize("with_rule", [False, True])
def test_independent_decay_shrinks_by_schedule_factor_times_lambda(with_rule):
    """``independent``: one step does θ ← θ·(1 − s_t·λ_group), s_t = lr_t / lr_peak, whatever the LR; the width
    rule's λ of a matrix is λ · shrink_mult = λ · m^(wd_exponent − 1)."""
    model = HandMLP(d_in=10, width=64, n_classes=3).double()
    with torch.device("meta"):
        base = HandMLP(d_in=10, width=16, n_classes=3)
    rule = WidthScaling.from_models(model, base=base, wd_convention="independent") if with_rule else None
    lam = 0.05
    groups = param_groups(model, LR, lam, rule, wd_convention="independent")
    assert {g["wd_convention"] for g in groups} == {"independent"}
    factors = [1.0, 0.9, 0.5, 0.25, 0.125]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _zero_grad_steps(model, groups, factors)
    for g in groups:
        for name, p in zip(g["param_names"], g["params"]):
            if g["param_class"] == "vector":
                lam_t = 0.0
            elif g["param_class"] == "matrix" and with_rule:
                lam_t = lam * 4**-0.5  # m = 4, shrink ∝ m^(0.5 − 1)
            else:
                lam_t = lam
            expect = before[name] * math.prod(1 - s * lam_t for s in factors[:-1])
            torch.testing.assert_close(p.detach(), expect, rtol=1e-14, atol=0), name


def test_coupled_and_independent_are_the_same_physics():
    """Coupled with (lr, λ_c) and independent with (lr, λ_i = lr·λ_c): the same torch weight decays per tensor
    at every width, hence the same training (checked over real AdamW steps)."""
    lam_c = 0.1
    base = hf_llama(32, 64, meta=True)
    runs = {}
    for conv, lam in (("coupled", lam_c), ("independent", LR * lam_c)):
        model = hf_llama(64, 256, seed=1)
        rule = WidthScaling.from_models(model, base=base, wd_convention=conv, wd_exponent=0.5)
        groups = param_groups(model, LR, lam, rule)
        runs[conv] = (model, groups)
    wd_c = {n: g["weight_decay"] for g in runs["coupled"][1] for n in g["param_names"]}
    wd_i = {n: g["weight_decay"] for g in runs["independent"][1] for n in g["param_names"]}
    assert wd_c.keys() == wd_i.keys()
    for n in wd_c:
        assert wd_i[n] == pytest.approx(wd_c[n], rel=1e-13, abs=0), n
    ids = torch.randint(64, (2, 9), generator=torch.Generator().manual_seed(0))
    for model, groups in runs.values():
        opt = torch.optim.AdamW(groups, lr=LR)
        for _ in range(3):
            loss = model(ids[:, :-1], labels=ids[:, 1:].contiguous()).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (n, a), (_, b) in zip(runs["coupled"][0].named_parameters(), runs["independent"][0].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7), n


def test_wd_convention_errors():
    model = HandMLP()
    with pytest.raises(ValueError, match="wd_convention"):
        param_groups(model, LR, WD, wd_convention="decoupled")
    with pytest.raises(ValueError, match="wd_convention"):
        WidthScaling(32, 64, wd_convention="decoupled")
    with pytest.raises(ValueError, match="differs from the width rule"):
        param_groups(model, LR, WD, WidthScaling(64, 64), wd_convention="independent")
    # lr 0: the torch weight decay of an independent group is 0 (nothing moves), not a division by zero
    groups = param_groups(model, 0.0, WD, wd_convention="independent")
    assert all(g["weight_decay"] == 0.0 for g in groups)


# ------------------------------------------------------------------------------------ mup as an oracle
class _MupNet(nn.Module):
    """A small pre-norm transformer-like net of nn.Linear layers with its own FFN size."""

    def __init__(self, vocab: int, d: int, ffn: int, n_out: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    norm=nn.LayerNorm(d),
                    q=nn.Linear(d, d, bias=False),
                    o=nn.Linear(d, d),
                    up=nn.Linear(d, ffn),
                    down=nn.Linear(ffn, d),
                )
            )
            for _ in range(2)
        )
        self.head = nn.Linear(d, n_out)


@pytest.mark.parametrize("use_delta", [False, True])
def test_factors_equal_mups_muadamw(use_delta):
    """Per canonical name, our lr and λ factors (wd_exponent=1) equal those of mup's MuAdamW for the same
    base/target pair, including a FFN that grows faster than the hidden size (down has its own m)."""
    mup = pytest.importorskip("mup")
    target = _MupNet(50, 96, 480, 7)
    base, delta = _MupNet(50, 32, 64, 7), _MupNet(50, 64, 128, 7)
    mup.set_base_shapes(target, base, delta=delta if use_delta else None, rescale_params=False, do_assert=False)
    opt = mup.MuAdamW(target.parameters(), lr=LR, weight_decay=WD)
    theirs = {}
    names = {id(p): n for n, p in target.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            theirs[names[id(p)]] = (g["lr"] / LR, g["weight_decay"] / WD)
    with torch.device("meta"):
        base_meta, delta_meta = _MupNet(50, 32, 64, 7), _MupNet(50, 64, 128, 7)
    rule = WidthScaling.from_models(target, base=base_meta, delta=delta_meta if use_delta else None, wd_exponent=1.0)
    an = lw.anatomy(target)
    assert set(theirs) == {r.name for r in an}
    for row in an:
        cls = rule.param_class(row)
        ours = (rule.lr_mult(cls, row.name), rule.wd_mult(cls, row.name))
        assert ours == pytest.approx(theirs[row.name], rel=1e-12), row.name
    assert theirs["blocks.0.down.weight"][0] == pytest.approx(64 / 480)  # fan-in multiplier 7.5, not 3
