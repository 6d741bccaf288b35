"""Table-driven properties every optimizer of layerwise must have (torch AdamW is the control row).

To cover a new optimizer, add a row to ``OPTIMIZERS``: a name and a factory ``params -> Optimizer``
(``params`` is a list of parameter groups carrying ``param_names``).  Each row must

* minimise a small least-squares problem (loss falls below a tenth of its start);
* keep the dtype of every parameter (fp32 and bf16) and of its state tensors' dtypes stable;
* survive save/load mid-run: continuing from a reloaded state dict gives the same parameters as
  continuing without the round trip.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch

from layerwise.optim import registry
from layerwise.optim.alphaadam import AlphaAdam, CautiousAdamW
from layerwise.optim.muon import MuonAdamW

Factory = Callable[[list], torch.optim.Optimizer]


def _muon(groups: list[dict]) -> MuonAdamW:
    """The matrix on the Muon side, the bias on the AdamW side (the problem's names are not block names)."""
    return MuonAdamW([{**groups[0], "use_muon": True}, {**groups[1], "use_muon": False}], lr=5e-2, weight_decay=0.01)


OPTIMIZERS: list[tuple[str, Factory]] = [
    ("torch_adamw", lambda p: torch.optim.AdamW(p, lr=5e-2, weight_decay=0.01)),
    ("alphaadam", lambda p: AlphaAdam(p, lr=5e-2, weight_decay=0.01)),  # default: fast path
    (
        "alphaadam_eager_current_density_floor",
        lambda p: AlphaAdam(p, lr=5e-2, mask_ref="current", alpha_mode="density", floor=0.2, fast=False),
    ),
    ("alphaadam_eager_previous_norm", lambda p: AlphaAdam(p, lr=5e-2, fast=False)),
    ("alphaadam_unmasked", lambda p: AlphaAdam(p, lr=5e-2, masking=False)),
    ("cautious_adamw", lambda p: CautiousAdamW(p, lr=5e-2, weight_decay=0.01)),
    ("cautious_adamw_eager", lambda p: CautiousAdamW(p, lr=5e-2, fast=False)),
    ("torch_adam_l2", lambda p: torch.optim.Adam(p, lr=5e-2, weight_decay=0.01)),
    ("muon_adamw", _muon),
]
IDS = [name for name, _ in OPTIMIZERS]


def test_every_registered_optimizer_has_a_row():
    classes = {type(factory(Problem().groups())) for _, factory in OPTIMIZERS}
    assert {entry.cls() for entry in registry.OPTIMIZERS.values()} <= classes


class Problem:
    """A tiny two-tensor least-squares model: ``y = x @ W.T + b`` (W: 8x16, b: 8)."""

    def __init__(self, seed: int = 0, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(64, 16, generator=gen)
        self.y = self.x @ torch.randn(8, 16, generator=gen).T + 0.5
        self.w = torch.nn.Parameter((0.1 * torch.randn(8, 16, generator=gen)).to(dtype))
        self.b = torch.nn.Parameter(torch.zeros(8, dtype=dtype))

    def groups(self) -> list[dict]:
        return [
            {"params": [self.w], "param_names": ["w"]},
            {"params": [self.b], "param_names": ["b"], "weight_decay": 0.0},
        ]

    def loss(self) -> torch.Tensor:
        pred = self.x @ self.w.float().T + self.b.float()
        return ((pred - self.y) ** 2).mean()

    def step(self, opt: torch.optim.Optimizer) -> float:
        opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        opt.step()
        return loss.item()


@pytest.mark.parametrize("name,factory", OPTIMIZERS, ids=IDS)
def test_minimises_a_small_problem(name, factory):
    prob = Problem()
    opt = factory(prob.groups())
    start = prob.loss().item()
    for _ in range(150):
        prob.step(opt)
    assert prob.loss().item() < 0.1 * start, name


@pytest.mark.parametrize("name,factory", OPTIMIZERS, ids=IDS)
def test_keeps_dtypes(name, factory):
    prob = Problem(dtype=torch.bfloat16)
    opt = factory(prob.groups())
    start = prob.loss().item()
    for _ in range(3):
        prob.step(opt)
    for p in (prob.w, prob.b):
        assert p.dtype == torch.bfloat16
        assert p.grad is None or p.grad.dtype == torch.bfloat16
        state = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                assert state[key].dtype == p.dtype, (name, key)
        if "step" in state:
            assert state["step"].dtype == torch.float32
    assert torch.isfinite(prob.loss()) and prob.loss().item() < start


@pytest.mark.parametrize("name,factory", OPTIMIZERS, ids=IDS)
def test_survives_save_load_mid_run(name, factory):
    a, b = Problem(1), Problem(1)
    opt_a = factory(a.groups())
    for _ in range(4):
        a.step(opt_a)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b.w.data.copy_(a.w.data)
    b.b.data.copy_(a.b.data)
    opt_b = factory(b.groups())
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf))
    for _ in range(4):
        a.step(opt_a)
        b.step(opt_b)
    assert torch.equal(a.w, b.w) and torch.equal(a.b, b.b), name
