"""LR schedules: each against its formula written out here, and the one definition everyone uses."""

import math

import pytest
import torch

from layerwise.schedules import SCHEDULES, Schedule, lr_scheduler

T, W, R = 100, 10, 0.1


def _ref(name, s, decay_frac=0.2, shape="linear"):
    """The formulas of the module docstring, by hand."""
    if s < W:
        return (s + 1) / W
    p = min(1.0, (s - W) / (T - W))
    if name == "cosine":
        return R + (1 - R) * 0.5 * (1 + math.cos(math.pi * p))
    if name == "linear":
        return R + (1 - R) * (1 - p)
    if name == "constant":
        return 1.0
    d = T - round(decay_frac * T)
    if s < d:
        return 1.0
    q = min(1.0, (s - d) / (T - d))
    return R + (1 - R) * (1 - (math.sqrt(q) if shape == "sqrt" else q))


@pytest.mark.parametrize(
    "name,shape",
    [("cosine", "linear"), ("linear", "linear"), ("constant", "linear"), ("wsd", "linear"), ("wsd", "sqrt")],
)
def test_schedule_matches_formula(name, shape):
    f = Schedule(name, T, W, R, 0.2, shape)
    for s in range(0, T + 5):
        assert f(s) == pytest.approx(_ref(name, s, 0.2, shape), abs=1e-12), s


def test_wsd_shape_points():
    f = Schedule("wsd", 100, 10, 0.0, 0.2)
    assert f(9) == 1.0 and f(79) == 1.0 and f(80) == 1.0  # stable until the cool-down starts at step 80
    assert f(90) == pytest.approx(0.5) and f(100) == 0.0
    g = Schedule("wsd", 100, 10, 0.0, 0.2, "sqrt")
    assert g(85) == pytest.approx(1 - math.sqrt(0.25))  # 1 - sqrt cools faster early
    assert g(85) < f(85)


def test_schedule_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown name"):
        Schedule("step", 10)
    with pytest.raises(ValueError, match="decay_shape"):
        Schedule("wsd", 10, decay_shape="cubic")
    with pytest.raises(ValueError, match="overlaps"):
        Schedule("wsd", 100, 90, decay_frac=0.2)
    with pytest.raises(ValueError, match="decay_frac"):
        Schedule("wsd", 100, 0, decay_frac=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        Schedule("cosine", 10, 11)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        Schedule("cosine", 10, 0, 1.5)
    assert SCHEDULES == ("cosine", "wsd", "linear", "constant")


def test_lr_scheduler_drives_every_group_and_state_is_only_the_step():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.5}], lr=1.0)
    sched = lr_scheduler(opt, "wsd", 20, warmup_steps=2, min_lr_ratio=0.0, decay_frac=0.5)
    f = Schedule("wsd", 20, 2, 0.0, 0.5)
    for s in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(f(s)) and opt.param_groups[1]["lr"] == pytest.approx(
            0.5 * f(s)
        )
        opt.step()
        sched.step()
    assert sched.state_dict()["lr_lambdas"] == [None, None]  # a closure: resume follows the new config


def test_trainer_and_lightning_use_the_same_schedule():
    from layerwise.lab.train import make_schedule

    for name in SCHEDULES:
        f = Schedule(name, 50, 5, 0.1, 0.3, "sqrt")
        for s in (0, 4, 5, 20, 36, 49, 50):
            assert make_schedule(50, 0.1, 0.1, name, 0.3, "sqrt")(s) == f(s)
    pytest.importorskip("lightning")
    from layerwise.integrations.lightning import LayerwiseLM

    m = LayerwiseLM(
        torch.nn.Linear(2, 2),
        "adamw",
        warmup_steps=5,
        total_steps=50,
        min_lr_ratio=0.1,
        schedule="wsd",
        decay_frac=0.3,
        decay_shape="sqrt",
    )
    f = Schedule("wsd", 50, 5, 0.1, 0.3, "sqrt")
    assert [m.lr_factor(s) for s in range(55)] == [f(s) for s in range(55)]
    with pytest.raises(ValueError, match="needs total_steps"):
        LayerwiseLM(torch.nn.Linear(2, 2), "adamw", schedule="wsd")
