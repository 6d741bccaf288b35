"""Table-driven properties every weight-decay controller of ``layerwise.decay.DECAY_CONTROLLERS`` must have.

Each row of ``CONTROLLERS`` (one per registered name; a test checks none is missing) is run on the nano
reference model with torch AdamW over ``param_groups(..., per_matrix=per_matrix_for(name, **options))`` and a
decaying LR schedule, and must

* round-trip its ``state_dict`` (a fresh controller that loads it reports the same state and table);
* resume: stopping after k steps, rebuilding model, optimizer, scheduler and controller from their state dicts
  and continuing gives the parameters, decays, step count and version of the uninterrupted run — whether the
  controller is rebuilt before the LR scheduler and ``optimizer.load_state_dict`` or after both;
* only ever set finite, non-negative decays (groups and ``table()``);
* change nothing in the optimizer but ``weight_decay``: no group's other hyper-parameters, no group's
  parameter list, no group count after construction;
* leave the decay to the optimizer: a step with the controller equals a plain optimizer step with the
  ``weight_decay`` values the groups held when the step ran.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _decay_helpers import batches, make_model, train_step

import layerwise as lw
from layerwise.decay import DECAY_CONTROLLERS, build_decay, per_matrix_for

#: name -> options for a short run (AlphaDecay / AdaDecay recompute every 2 steps instead of 500)
CONTROLLERS: dict[str, dict] = {
    "uniform": {},
    "alphadecay": {"interval": 2},
    "typedecay": {},
    "awd": {},
    "adadecay": {"interval": 2},
}
STEPS, SPLIT = 6, 3


def test_every_registered_controller_has_a_row():
    assert set(CONTROLLERS) == set(DECAY_CONTROLLERS)


def _lr_factor(step: int) -> float:
    return 1.0 / (1.0 + step)


def _optimizer(name: str, model):
    groups = lw.param_groups(model, lr=1e-2, weight_decay=0.1, per_matrix=per_matrix_for(name, **CONTROLLERS[name]))
    opt = torch.optim.AdamW(groups, lr=1e-2, foreach=False)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)


def _build(name: str, model):
    opt, sched = _optimizer(name, model)
    return opt, sched, build_decay(name, opt, model, **CONTROLLERS[name])


def _step(model, opt, sched, x) -> None:
    train_step(model, opt, x)
    sched.step()


def _groups_without_decay(opt, step: int) -> list[dict]:
    """Every group key but ``weight_decay``; ``lr`` as its ratio to the schedule's value at ``step``."""
    return [
        {
            k: [id(p) for p in v]
            if k == "params"
            else round(v / (_lr_factor(step) * g["initial_lr"]), 9)
            if k == "lr"
            else v
            for k, v in g.items()
            if k != "weight_decay"
        }
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
    opt, sched, decay = _build(name, model)
    for x in batches(SPLIT):
        _step(model, opt, sched, x)
    sd = copy.deepcopy(decay.state_dict())
    model2 = copy.deepcopy(model)
    _, _, decay2 = _build(name, model2)
    decay2.load_state_dict(copy.deepcopy(sd))
    assert repr(decay2.state_dict()) == repr(sd)
    assert [(r["name"], float(r["weight_decay"])) for r in decay2.table()] == [
        (r["name"], float(r["weight_decay"])) for r in decay.table()
    ]


@pytest.mark.parametrize("order", ["controller_first", "controller_last"])
@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_resume_equals_uninterrupted_and_only_weight_decay_changes(name, order):
    xs = batches(STEPS)
    model = make_model()
    opt, sched, decay = _build(name, model)
    groups = _groups_without_decay(opt, 0)
    saved = None
    for i, x in enumerate(xs):
        if i == SPLIT:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), decay.state_dict()))
        _step(model, opt, sched, x)
        _check_decays(opt, decay)
        assert _groups_without_decay(opt, i + 1) == groups  # the controller wrote weight_decay only
    # resume from step SPLIT with fresh objects; other initial weights: everything must come from the checkpoint
    model2 = make_model(seed=99)
    model2.load_state_dict(saved[0])
    if order == "controller_first":  # controller, then scheduler, then the optimizer's state
        opt2, sched2, decay2 = _build(name, model2)
        opt2.load_state_dict(saved[1])
        sched2.load_state_dict(saved[2])
    else:  # scheduler and the optimizer's state first, the controller last
        opt2, sched2 = _optimizer(name, model2)
        opt2.load_state_dict(saved[1])
        sched2.load_state_dict(saved[2])
        decay2 = build_decay(name, opt2, model2, **CONTROLLERS[name])
    decay2.load_state_dict(saved[3])
    for x in xs[SPLIT:]:
        _step(model2, opt2, sched2, x)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    assert [float(g["weight_decay"]) for g in opt2.param_groups] == pytest.approx(
        [float(g["weight_decay"]) for g in opt.param_groups], rel=1e-6
    )
    assert [r["name"] for r in decay2.table()] == [r["name"] for r in decay.table()]
    assert [float(r["weight_decay"]) for r in decay2.table()] == pytest.approx(
        [float(r["weight_decay"]) for r in decay.table()], rel=1e-6
    )
    assert (decay2.step, decay2.version, decay2.last_update_step) == (decay.step, decay.version, decay.last_update_step)


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_the_optimizer_applies_the_decay_the_controller_writes(name):
    model = make_model()
    opt, sched, decay = _build(name, model)
    in_force: list[list[float]] = []
    # registered after the controller's hooks, so it sees the decays the step is about to use
    opt.register_step_pre_hook(lambda o, a, k: in_force.append([float(g["weight_decay"]) for g in o.param_groups]))
    twin = make_model(seed=7)
    twin_opt, twin_sched = _optimizer(name, twin)
    decayed = False
    for x in batches(STEPS):
        twin.load_state_dict(model.state_dict())
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (a plain load would share the moments)
        twin_sched.load_state_dict(sched.state_dict())
        _step(model, opt, sched, x)
        for g, wd in zip(twin_opt.param_groups, in_force[-1]):
            g["weight_decay"] = wd
        _step(twin, twin_opt, twin_sched, x)
        for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=n)
        decayed |= any(wd > 0 for wd in in_force[-1])
    assert decayed  # the check would be empty with every decay at 0
