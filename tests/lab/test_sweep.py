import json

import pytest

from layerwise.lab.cli import main
from layerwise.lab.config import ConfigError
from layerwise.lab.sweep import _argmin, width_overrides


def test_sweep_tiny_grid_table_plots_and_resume(tmp_path, corpus_file, capsys):
    out = tmp_path / "sw"
    args = [
        "sweep",
        "--preset",
        "smoke",
        "--widths",
        "32,64",
        "--lrs",
        "1e-3,1e-2",
        "--wds",
        "0,0.1",
        "--parametrization",
        "sp,mup-sqrtwd,mup-lrwd",
        "--out",
        str(out),
        "--set",
        f"data.corpus={corpus_file}",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=0",
    ]
    assert main(args) == 0
    res = json.loads((out / "sweep.json").read_text())
    for p in ("sp", "mup-sqrtwd", "mup-lrwd"):
        r = res["parametrizations"][p]
        grid = r["grids"]["64"]
        assert len(grid) == 2 and len(grid[0]) == 2
        best = r["best"]["64"]
        assert best["val_loss"] == min(v for row in grid for v in row)
        assert (out / "plots" / f"landscape_{p}.png").stat().st_size > 1000
    # mu-P at width 64 with base 32: the resolved run config says so
    cfg = (out / "mup-sqrtwd/w64/lr0.001_wd0.1/seed0/config.toml").read_text()
    assert 'parametrization = "mup"' in cfg and "base_hidden_size = 32" in cfg and "hidden_size = 64" in cfg
    # at the base width both muP variants are plain muP: one shared set of runs, under mup/
    assert not (out / "mup-sqrtwd" / "w32").exists() and not (out / "mup-lrwd" / "w32").exists()
    assert (out / "mup/w32/lr0.01_wd0.1/seed0/summary.json").exists()
    assert res["parametrizations"]["mup-sqrtwd"]["grids"]["32"] == res["parametrizations"]["mup-lrwd"]["grids"]["32"]
    # ... while the wide runs differ by the decay exponent
    sq = (out / "mup-sqrtwd/w64/lr0.001_wd0.1/seed0/config.toml").read_text()
    lw = (out / "mup-lrwd/w64/lr0.001_wd0.1/seed0/config.toml").read_text()
    assert "wd_exponent = 0.5" in sq and "wd_exponent = 1.0" in lw
    capsys.readouterr()
    assert main(args) == 0
    assert "sweep: 20 runs, 20 already complete, 0 to run" in capsys.readouterr().out
    # another schedule: the finished runs are not this sweep's, so it refuses instead of reprinting them
    assert main([*args, "--set", "optim.warmup_frac=0.5"]) == 2
    assert "optim.warmup_frac: 0.1 -> 0.5" in capsys.readouterr().err


def test_sweep_seeds_give_standard_errors_and_per_seed_shifts(tmp_path, corpus_file):
    out = tmp_path / "sw"
    args = [
        "sweep",
        "--preset",
        "smoke",
        "--widths",
        "32,64",
        "--lrs",
        "1e-3,1e-2",
        "--wds",
        "0.1",
        "--parametrization",
        "mup",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--set",
        f"data.corpus={corpus_file}",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.eval_every=0",
    ]
    assert main(args) == 0
    r = json.loads((out / "sweep.json").read_text())["parametrizations"]["mup"]
    losses = [
        json.loads((out / f"mup/w64/lr0.01_wd0.1/seed{s}/summary.json").read_text())["final_val_loss"] for s in (0, 1)
    ]
    mean = sum(losses) / 2
    assert r["grids"]["64"][1][0] == pytest.approx(mean)
    assert r["sem"]["64"][1][0] == pytest.approx(abs(losses[0] - losses[1]) / 2)  # s.e. of 2 = |a - b| / 2
    assert len(r["shift_per_seed"]) == 2
    # the proxy cells tied with its best (within 2 median s.e.) include the best; the score is the mean wide
    # loss at those cells minus the wide best
    ties = r["proxy_ties"]
    assert [r["best"]["32"]["lr"], r["best"]["32"]["wd"]] in ties
    wide, lrs = r["grids"]["64"], [1e-3, 1e-2]
    expect = sum(wide[lrs.index(lr)][0] for lr, _ in ties) / len(ties) - r["best"]["64"]["val_loss"]
    assert r["regret_ties"] == pytest.approx(expect)
    assert "shift (lr, wd) per seed" in (out / "sweep.md").read_text()


def test_sweep_helpers_and_errors():
    assert _argmin([[3.0, 2.0], [float("nan"), 1.5]]) == (1, 1)
    assert width_overrides(128, 64)["model.intermediate_size"] == 352
    with pytest.raises(ConfigError, match="multiple of the head size"):
        width_overrides(100, 64)
