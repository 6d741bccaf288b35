"""Table-driven properties every weight-decay controller of ``layerwise.decay.DECAY_CONTROLLERS`` must have.

Each row of ``CONTROLLERS`` (one per registered name; a test checks none is missing) is run on the nano
reference model with torch AdamW and must

* round-trip its ``state_dict`` (a fresh controller that loads it reports the same state and table);
* resume: stopping after k steps, rebuilding model, optimizer and controller from their state dicts and
  continuing gives the parameters and decays of the uninterrupted run;
* only ever set finite, non-negative decays (groups and ``table()``);
* change nothing in the optimizer but ``weight_decay``: no group's other hyper-parameters, no group's
  parameter list, no group count after construction.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _decay_helpers import batches, make_model, train_step

from layerwise.decay import DECAY_CONTROLLERS, build_decay

#: name -> options for a short run (AlphaDecay recomputes every 2 steps instead of 500)
CONTROLLERS: dict[str, dict] = {
    "uniform": {},
    "alphadecay": {"interval": 2},
    "typedecay": {},
    "awd": {},
    "adadecay": {},
}
STEPS, SPLIT = 6, 3


def test_every_registered_controller_has_a_row():
    assert set(CONTROLLERS) == set(DECAY_CONTROLLERS)


def _build(name: str, model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    return opt, build_decay(name, opt, model, **CONTROLLERS[name])


def _groups_without_decay(opt) -> list[dict]:
    return [
        {k: ([id(p) for p in v] if k == "params" else copy.deepcopy(v)) for k, v in g.items() if k != "weight_decay"}
        for g in opt.param_groups
    ]


def _check_decays(opt, decay) -> None:
    for g in opt.param_groups:
        wd = float(g["weight_decay"])
        assert math.isfinite(wd) and wd >= 0.0, g.get("param_names")
    for row in decay.table():
        wd = float(row["weight_decay"])
        assert math.isfinite(wd) and wd >= 0.0, row["name"]


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_state_dict_round_trip(name):
    model = make_model()
    opt, decay = _build(name, model)
    for x in batches(SPLIT):
        train_step(model, opt, x)
    sd = copy.deepcopy(decay.state_dict())
    model2 = copy.deepcopy(model)
    opt2, decay2 = _build(name, model2)
    decay2.load_state_dict(copy.deepcopy(sd))
    assert repr(decay2.state_dict()) == repr(sd)
    assert [(r["name"], float(r["weight_decay"])) for r in decay2.table()] == [
        (r["name"], float(r["weight_decay"])) for r in decay.table()
    ]


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_resume_equals_uninterrupted_and_only_weight_decay_changes(name):
    xs = batches(STEPS)
    model = make_model()
    opt, decay = _build(name, model)
    groups = _groups_without_decay(opt)
    saved = None
    for i, x in enumerate(xs):
        if i == SPLIT:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), decay.state_dict()))
        train_step(model, opt, x)
        _check_decays(opt, decay)
        assert _groups_without_decay(opt) == groups  # the controller wrote weight_decay and nothing else
    # resume from step SPLIT: fresh objects built the same way, then their state dicts
    model2 = make_model(seed=99)  # other initial weights: everything must come from the checkpoint
    model2.load_state_dict(saved[0])
    opt2, decay2 = _build(name, model2)
    opt2.load_state_dict(saved[1])
    decay2.load_state_dict(saved[2])
    for x in xs[SPLIT:]:
        train_step(model2, opt2, x)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    assert [float(g["weight_decay"]) for g in opt2.param_groups] == pytest.approx(
        [float(g["weight_decay"]) for g in opt.param_groups], rel=1e-6
    )
    assert [float(r["weight_decay"]) for r in decay2.table()] == pytest.approx(
        [float(r["weight_decay"]) for r in decay.table()], rel=1e-6
    )
