"""param_groups: class membership, hyper-parameters, rules, dedupe, errors, torch.optim compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerwise as lw
from layerwise.lab.model import build_model
from layerwise.optim.groups import param_groups


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (on a loaded 2-core machine two threads spin and run ~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _by_label(groups):
    out = {}
    for g in groups:
        assert g["group"] not in out, f"label {g['group']} appears twice"
        out[g["group"]] = g
    return out


def _all_names(groups):
    return [n for g in groups for n in g["param_names"]]


def test_default_groups_on_reference_model():
    model = build_model("nano", vocab_size=64)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    by = _by_label(groups)
    assert set(by) == {"embedding", "matrix", "readout", "vector"}
    names = dict(model.named_parameters())
    # every parameter exactly once, names aligned with tensors
    assert sorted(_all_names(groups)) == sorted(names)
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for n, p in zip(g["param_names"], g["params"]):
            assert names[n] is p
    assert by["embedding"]["param_names"] == ["embed_tokens.weight"]
    assert by["readout"]["param_names"] == ["lm_head.weight"]
    assert len(by["matrix"]["params"]) == 7 * 2  # q,k,v,o,gate,up,down x 2 layers
    assert all(n.endswith("norm.weight") for n in by["vector"]["param_names"])
    assert len(by["vector"]["params"]) == 2 * 2 + 1
    for label in ("embedding", "matrix", "readout"):
        assert by[label]["lr"] == 1e-3 and by[label]["weight_decay"] == 0.1
    assert by["vector"]["lr"] == 1e-3 and by["vector"]["weight_decay"] == 0.0
    for g in groups:
        assert g["lr_scale"] == 1.0 and g["wd_scale"] == 1.0


def test_torch_adamw_applies_group_decay():
    """One AdamW step: θ1 = θ0·(1 − lr·λ) − lr·g/(|g| + eps); recover λ·lr per group from the step."""
    torch.manual_seed(0)
    model = build_model("nano", vocab_size=64).double()
    opt = torch.optim.AdamW(param_groups(model, 1e-2, 0.5), eps=1e-30)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(64, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert {g["group"] for g in opt.param_groups} == {"embedding", "matrix", "readout", "vector"}
    for n, p in model.named_parameters():
        g = grads[n]
        adam = torch.where(g != 0, torch.sign(g), torch.zeros_like(g))
        expected_wd = 0.0 if n.endswith("norm.weight") else 0.5
        expected = before[n] * (1 - 1e-2 * expected_wd) - 1e-2 * adam
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12, msg=n)


def test_biases_are_vectors_and_frozen_are_skipped():
    lin = nn.Sequential()
    lin.add_module("q_proj", nn.Linear(4, 4, bias=True))
    lin.add_module("lm_head", nn.Linear(4, 3, bias=True))
    lin.lm_head.bias.requires_grad_(False)
    by = _by_label(param_groups(lin, 0.1, 0.5))
    assert by["vector"]["param_names"] == ["q_proj.bias"]
    assert by["vector"]["weight_decay"] == 0.0
    assert by["matrix"]["param_names"] == ["q_proj.weight"]
    assert by["readout"]["param_names"] == ["lm_head.weight"]
    assert "lm_head.bias" not in _all_names(by.values())


def test_tied_weights_are_placed_once_under_first_name():
    model = build_model("nano", vocab_size=64)
    model.lm_head.weight = model.embed_tokens.weight
    groups = param_groups(model, 1e-3, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert "lm_head.weight" not in _all_names(groups)
    # explicit (name, param) pairs with the same tensor twice: deduped by identity, first name kept
    w = nn.Parameter(torch.randn(5, 3))
    groups = param_groups([("embed_tokens.weight", w), ("lm_head.weight", w)], 1e-3, 0.1)
    assert _all_names(groups) == ["embed_tokens.weight"]


def test_canonical_names_through_wrappers():
    model = build_model("nano", vocab_size=64)
    wrapped = nn.Module()
    wrapped.module = model  # like DDP
    names = _all_names(param_groups(wrapped, 1e-3, 0.1))
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def _with_fake_multiplier():
    model = build_model("nano", vocab_size=64)
    q = model.layers[0].self_attn.q_proj
    q.row_multiplier = nn.Parameter(torch.ones(q.out_features))
    return model


def test_multiplier_group_simulated():
    model = _with_fake_multiplier()
    by = _by_label(param_groups(model, 1e-3, 0.1, multiplier_weight_decay=2e-3, multiplier_lr_scale=0.5))
    g = by["multiplier"]
    assert g["param_names"] == ["layers.0.self_attn.q_proj.row_multiplier"]
    assert g["weight_decay"] == 2e-3
    assert g["lr"] == pytest.approx(5e-4, rel=0, abs=1e-18)
    assert g["lr_scale"] == 0.5
    # dropping "multiplier" from no_decay gives them the main decay
    by = _by_label(param_groups(model, 1e-3, 0.1, no_decay=("norm", "bias")))
    assert by["multiplier"]["weight_decay"] == 0.1


def test_multiplier_group_with_real_wrapper():
    import layerwise.multipliers as mult

    model = build_model("nano", vocab_size=64)
    new = mult.add_multipliers(model, kind="rowcol", placement="paper")
    groups = param_groups(model, 1e-3, 0.1)
    by = _by_label(groups)
    assert {id(p) for p in by["multiplier"]["params"]} == {id(p) for p in new}
    assert all(n.rsplit(".", 1)[-1] in ("row_multiplier", "col_multiplier") for n in by["multiplier"]["param_names"])
    assert by["multiplier"]["weight_decay"] == 2e-3
    # the wrapped weights keep their names and class
    assert "layers.0.self_attn.q_proj.weight" in by["matrix"]["param_names"]
    assert by["embedding"]["param_names"] == ["embed_tokens.weight"]
    assert by["matrix"]["weight_decay"] == 0.1 and by["vector"]["weight_decay"] == 0.0
    assert sorted(_all_names(groups)) == sorted(n for n, _ in model.named_parameters())


def test_no_decay_embed_token():
    model = build_model("nano", vocab_size=64)
    by = _by_label(param_groups(model, 1e-3, 0.1, no_decay=("norm", "bias", "multiplier", "embed")))
    assert by["embedding"]["weight_decay"] == 0.0 and by["matrix"]["weight_decay"] == 0.1


def test_user_rules_first_match_wins():
    model = build_model("nano", vocab_size=64)
    rules = [
        (r"self_attn\.(q|k)_proj", {"group": "qk", "lr_scale": 0.5, "weight_decay": 0.3}),
        (r"self_attn", {"group": "attn"}),  # q/k already taken by the first rule
        (r"lm_head", "vector"),  # force a class
    ]
    by = _by_label(param_groups(model, 1e-3, 0.1, rules=rules))
    assert sorted(by["qk"]["param_names"]) == sorted(
        f"layers.{i}.self_attn.{t}_proj.weight" for i in range(2) for t in "qk"
    )
    assert by["qk"]["lr"] == pytest.approx(5e-4) and by["qk"]["weight_decay"] == 0.3
    assert by["qk"]["param_class"] == "matrix"
    assert sorted(by["attn"]["param_names"]) == sorted(
        f"layers.{i}.self_attn.{t}_proj.weight" for i in range(2) for t in "vo"
    )
    assert by["attn"]["weight_decay"] == 0.1
    # lm_head forced into the vector class: no decay, grouped with the norms
    assert "lm_head.weight" in by["vector"]["param_names"] and by["vector"]["weight_decay"] == 0.0


def test_strict_rules_name_unassigned_parameter():
    model = build_model("nano", vocab_size=64)
    with pytest.raises(ValueError, match="lm_head.weight.*not assigned"):
        param_groups(model, 1e-3, 0.1, rules=[(r"^(embed_tokens|layers|norm)", "matrix")], default_rules=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(multiplier_weight_decay=-1e-3), "multiplier_weight_decay"),
        (dict(no_decay="norm"), "no_decay"),
        (dict(rules=[(r"(", "matrix")]), "invalid regex"),
        (dict(rules=[(r"q_proj", "tensor")]), "param_class"),
        (dict(rules=[(r"q_proj", {"lr_mult": 2.0})]), "unknown key"),
        (dict(rules=[(r"q_proj", {"lr_scale": -2.0})]), "lr_scale"),
        (dict(scaling="mup"), "WidthScaling"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = build_model("nano", vocab_size=64)
    args = dict(lr=1e-3, weight_decay=0.1)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        param_groups(model, **args)


def test_duplicate_name_with_different_tensors():
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="q_proj.weight"):
        param_groups([("module.q_proj.weight", a), ("q_proj.weight", b)], 1e-3, 0.1)
    with pytest.raises(TypeError, match="pairs"):
        param_groups([a, b], 1e-3, 0.1)


def test_lazy_export():
    assert lw.param_groups is param_groups
