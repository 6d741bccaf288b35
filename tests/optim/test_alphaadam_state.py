"""AlphaAdam's ``alpha_lag=1`` state: ``alpha_sums`` checked when loaded and before a step (an error names the
parameter and moves nothing), converted on load; the lagged paths keep no scratch buffer."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from layerwise.optim import _cpu_kernel as CK
from layerwise.optim.alphaadam import AlphaAdam

NAMES = ["w", "b"]


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 5, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]


def _opt(params, fast, **kw) -> AlphaAdam:
    return AlphaAdam([{"params": params, "param_names": NAMES}], lr=1e-2, alpha_lag=1, fast=fast, **kw)


def _steps(opt, params, n, start) -> None:
    for i in range(start, start + n):
        gen = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _saved(opt) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


FASTS = [pytest.param(None, id="default-path"), pytest.param(False, id="eager")]
BAD = [
    pytest.param(torch.zeros(3), id="3-numbers"),
    pytest.param(torch.zeros(5), id="5-numbers"),
    pytest.param(torch.zeros(4, dtype=torch.int64), id="int64"),
    pytest.param([0.0, 0.0, 0.0, 1.0], id="list"),
]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("fast", FASTS)
def test_corrupt_alpha_sums_is_rejected_at_load_naming_the_parameter(fast, bad):
    params = _params()
    opt = _opt(params, fast)
    _steps(opt, params, 1, 0)
    sd = _saved(opt)
    sd["state"][1]["alpha_sums"] = bad
    fresh = _opt(params, fast)
    with pytest.raises(ValueError, match=r"alpha_sums.*parameter 'b'"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0  # nothing loaded


@pytest.mark.parametrize("fast", FASTS)
def test_loaded_alpha_sums_are_converted_and_resume_equals_uninterrupted(fast):
    """A valid state dict resumes bitwise; sums stored as float64, in another shape of 4 numbers or not
    contiguous are converted to the 4 contiguous fp32 numbers the step uses."""
    a, b, c = _params(), _params(), _params()
    opt_a, opt_b, opt_c = _opt(a, fast), _opt(b, fast), _opt(c, fast)
    for opt, ps in ((opt_a, a), (opt_b, b), (opt_c, c)):
        _steps(opt, ps, 2, 0)
    sd_b, sd_c = _saved(opt_b), _saved(opt_c)
    sd_c["state"][0]["alpha_sums"] = sd_c["state"][0]["alpha_sums"].double().reshape(2, 2)
    strided = torch.zeros(8, dtype=torch.float64)[::2]
    sd_c["state"][1]["alpha_sums"] = strided.copy_(sd_c["state"][1]["alpha_sums"])
    res_b, res_c = _opt(b, fast), _opt(c, fast)
    res_b.load_state_dict(sd_b)
    res_c.load_state_dict(sd_c)
    for p, q in zip(b, c):
        s = res_c.state[q]["alpha_sums"]
        assert s.dtype == torch.float32 and s.shape == (4,) and s.is_contiguous()
        assert torch.equal(s, res_b.state[p]["alpha_sums"])
    _steps(opt_a, a, 3, 2)
    _steps(res_b, b, 3, 2)
    _steps(res_c, c, 3, 2)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(torch.zeros(3), id="3-numbers"),
        pytest.param(torch.zeros(4, dtype=torch.float64), id="float64"),
        pytest.param(torch.zeros(8)[::2], id="non-contiguous"),
        pytest.param(torch.zeros(2, 2), id="2x2"),
    ],
)
@pytest.mark.parametrize("fast", FASTS)
def test_bad_alpha_sums_in_state_fail_before_the_step_moves_anything(fast, bad):
    params = _params()
    opt = _opt(params, fast)
    _steps(opt, params, 2, 0)
    opt.state[params[1]]["alpha_sums"] = bad
    before = copy.deepcopy(opt.state_dict()["state"])
    values = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"alpha_sums.*parameter 'b'"):
        _steps(opt, params, 1, 2)
    after = opt.state_dict()["state"]
    for i, st in before.items():
        assert float(after[i]["step"]) == float(st["step"]) == 2.0
        assert torch.equal(after[i]["exp_avg"], st["exp_avg"])
    assert all(torch.equal(p, v) for p, v in zip(params, values))


@pytest.mark.parametrize(
    "fast",
    [
        pytest.param(False, id="eager"),
        pytest.param(
            None,
            id="c-kernel",
            marks=pytest.mark.skipif(CK.load() is None, reason=f"C kernel unavailable: {CK.error()}"),
        ),
    ],
)
def test_lagged_steps_keep_no_scratch_buffer(fast):
    """The eager lagged update takes no scratch; the C kernel's first (exact) lagged step needs one, freed
    after it when no group uses the exact rule.  The exact rule keeps its buffer between steps."""
    params = _params()
    opt = _opt(params, fast)
    for i in range(3):
        _steps(opt, params, 1, i)
        assert opt._scratch == {}
    exact = AlphaAdam(params, fast=fast)
    _steps(exact, params, 2, 0)
    (buf,) = exact._scratch.values()
    assert buf.numel() == params[0].numel()
