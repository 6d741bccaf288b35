import json
import math
import statistics

import pytest
from tests._helpers import read_jsonl

from layerwise.lab.cli import _split_methods, main
from layerwise.lab.config import ConfigError
from layerwise.lab.experiments import mean_se, summarize
from layerwise.lab.methods import method_overrides


def test_mean_se_and_paired_differences():
    runs = {
        "a": {
            0: {"final_val_loss": 3.0, "final_val_ppl": 20.0, "wall_s": 1},
            1: {"final_val_loss": 3.4, "final_val_ppl": 30.0, "wall_s": 1},
        },
        "b": {
            0: {"final_val_loss": 2.9, "final_val_ppl": 19.0, "wall_s": 1},
            1: {"final_val_loss": 3.2, "final_val_ppl": 24.0, "wall_s": 1},
        },
    }
    rows = summarize(runs, ["a", "b"])
    assert rows[0]["paired_dloss"] == 0.0
    assert rows[1]["paired_dloss"] == pytest.approx(-0.15)
    assert rows[1]["paired_dloss_se"] == pytest.approx(statistics.stdev([-0.1, -0.2]) / 2**0.5)
    assert rows[1]["paired_dppl_pct"] == pytest.approx(statistics.fmean([-5.0, -20.0]))
    m, se = mean_se([1.0])  # one seed: no standard error (n/a), never 0
    assert m == 1.0 and math.isnan(se)


def test_method_specs():
    assert method_overrides("muon+multipliers") == {
        "optim.name": "muon",
        "multipliers.kind": "rowcol",
        "multipliers.placement": "paper",
    }
    assert method_overrides("adamw[optim.weight_decay=0.05]") == {"optim.weight_decay": 0.05}
    assert _split_methods("adamw[optim.lr=1,optim.eps=2],alphadecay") == ["adamw[optim.lr=1,optim.eps=2]", "alphadecay"]
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        method_overrides("adamw+nope")


def test_compare_runs_resumes_and_reports(tmp_path, corpus_file, capsys):
    out = tmp_path / "cmp"
    methods = "adamw,adamw-nowd,adamw[decay.name=uniform]"
    args = [
        "compare",
        "--preset",
        "smoke",
        "--methods",
        methods,
        "--seeds",
        "2",
        "--out",
        str(out),
        "--jobs",
        "2",
        "--set",
        f"data.corpus={corpus_file}",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.progress=false",
        "--set",
        "train.tensorboard=false",
        "--set",
        "train.log_every=1",
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["adamw", "adamw-nowd", "adamw_decay.name=uniform"]
    assert all(r["seeds"] == 2 for r in res["rows"])
    assert (out / "plots" / "loss_curves.png").stat().st_size > 1000

    def losses(method: str, seed: int) -> list[float]:
        rows = read_jsonl(out / method / f"seed{seed}" / "metrics.jsonl")
        return [r["loss"] for r in rows if "loss" in r]

    # the paired design: seed k gives every method the same initial weights and the same batch order
    for seed in (0, 1):
        base, nowd, uniform = (losses(m, seed) for m in ("adamw", "adamw-nowd", "adamw_decay.name=uniform"))
        assert len(base) == 6
        # a controller that changes nothing: the whole trajectory (weights and every batch) is the same
        assert uniform == pytest.approx(base, rel=1e-6, abs=0)
        # step 1 is the initial weights on the first batch: the same whatever the optimizer's decay ...
        assert nowd[0] == pytest.approx(base[0], rel=1e-7, abs=0)
        # ... and the decay does act afterwards (the test could not tell the methods apart otherwise)
        assert nowd[1:] != pytest.approx(base[1:], rel=1e-7, abs=0)
    assert losses("adamw", 0)[0] != pytest.approx(losses("adamw", 1)[0], rel=1e-4)  # seeds differ
    capsys.readouterr()
    assert main(args) == 0  # second time: everything is skipped
    assert capsys.readouterr().out.count("[skip]") == 6
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "adamw-nowd" in (tmp_path / "rep" / "results.md").read_text()
