"""param_groups(per_matrix=...): one group per controlled matrix, every other key as in the merged layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerwise as lw
from layerwise.lab.model import build_model

KEYS = ("lr", "weight_decay", "group", "param_class", "lr_scale", "wd_scale")


def _per_name(groups) -> dict[str, tuple]:
    return {n: tuple(g[k] for k in KEYS) for g in groups for n in g["param_names"]}


@pytest.mark.parametrize("scaling", [None, lw.WidthScaling(base_width=16, width=32, wd_exponent=0.5)])
def test_per_matrix_groups_keep_each_tensors_hyperparameters(scaling):
    torch.manual_seed(0)
    model = build_model("nano", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2)
    lw.add_multipliers(model)
    kw = dict(lr=1e-3, weight_decay=0.1, scaling=scaling)
    merged = lw.param_groups(model, **kw)
    split = lw.param_groups(model, **kw, per_matrix=True)
    assert _per_name(split) == _per_name(merged)  # same (lr, λ, label, class, scales) for every tensor
    blocks = [r.name for r in lw.anatomy(model).block_matrices()]
    assert [g["param_names"] for g in split if g["param_names"][0] in blocks] == [[n] for n in blocks]
    rest = [g for g in split if g["param_names"][0] not in blocks]
    assert [g["group"] for g in rest] == [g["group"] for g in merged if g["group"] != "matrix"]
    torch.optim.AdamW(split)  # a valid torch layout (every tensor once)


def test_authors_layout_puts_each_bias_with_its_matrix_or_beside_it():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    groups = lw.param_groups(model, lr=1e-3, weight_decay=0.1, per_matrix="authors")
    by = {tuple(g["param_names"]): g for g in groups}
    mid = by[("2.weight", "2.bias")]  # the first and the last nn.Linear are not in the authors' set
    assert (mid["weight_decay"], mid["group"], mid["param_class"]) == (0.1, "matrix", "matrix")  # the matrix's
    assert by[("0.bias", "4.bias")]["weight_decay"] == 0.0  # other biases: vectors, undecayed
    # a width rule gives the bias another lr: it gets a group of its own, with the matrix's decay and labels
    scaled = lw.param_groups(model, lr=1e-3, weight_decay=0.1, scaling=lw.WidthScaling(4, 8), per_matrix="authors")
    by = {tuple(g["param_names"]): g for g in scaled}
    w, b = by[("2.weight",)], by[("2.bias",)]
    assert (w["lr"], b["lr"]) == (pytest.approx(1e-3 / 2), 1e-3)
    keys = ("weight_decay", "group", "param_class", "wd_scale")
    assert [b[k] for k in keys] == [w[k] for k in keys] and w["weight_decay"] > 0
    opt = torch.optim.AdamW(scaled)
    lw.AlphaDecay(opt, model, modules="authors", interval=1, min_eigs=4)  # the layout it accepts
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert b["weight_decay"] == w["weight_decay"]  # the controller writes the matrix's decay to both
    with pytest.raises(TypeError, match="needs the model"):
        lw.param_groups(list(model.named_parameters()), lr=1e-3, weight_decay=0.1, per_matrix=True)
