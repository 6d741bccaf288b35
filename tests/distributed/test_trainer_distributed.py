"""The trainer under torchrun with 2 gloo processes == one process (same global batch), and DCP resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tests._helpers import read_jsonl

pytestmark = pytest.mark.timeout(300)


def _run(args, nproc, run_dir, corpus, extra=()):
    base = [
        "--preset",
        "smoke",
        "--set",
        f"data.corpus={corpus}",
        "--set",
        "train.progress=false",
        "--set",
        "train.tensorboard=false",
        "--set",
        "train.max_steps=8",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.log_every=4",
        "--set",
        "train.batch_size=4",
        *extra,
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "layerwise", *args, *base, "--out", str(run_dir)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "layerwise",
            *args,
            *base,
            "--out",
            str(run_dir),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _weights(run_dir, sharded=False):
    if sharded:
        from layerwise.lab.distributed import load_sharded_model_state

        return load_sharded_model_state(run_dir / "checkpoints" / "last.dcp")
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus_file):
    d = tmp_path_factory.mktemp("single")
    _run(["train"], 1, d / "run", corpus_file, ["--set", "decay.name=alphadecay", "--set", "decay.interval=4"])
    return d / "run"


def test_ddp_equals_single_process(single, tmp_path, corpus_file):
    _run(
        ["train"],
        2,
        tmp_path / "ddp",
        corpus_file,
        ["--set", "train.parallel=ddp", "--set", "decay.name=alphadecay", "--set", "decay.interval=4"],
    )
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s2["world_size"] == 2
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=1e-6)
    _close(_weights(single), _weights(tmp_path / "ddp"))
    # AlphaDecay: the same alpha and decays as one process
    a = read_jsonl(single / "spectral.jsonl")
    b = read_jsonl(tmp_path / "ddp" / "spectral.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 4, 8]
    for ra, rb in zip(a, b):
        for x, y in zip(ra["rows"], rb["rows"]):
            assert x["name"] == y["name"]
            assert y["alpha"] == pytest.approx(x["alpha"], rel=1e-5)
            assert y["weight_decay"] == pytest.approx(x["weight_decay"], rel=1e-5)


def test_fsdp_equals_single_process_and_dcp_resume(single, tmp_path, corpus_file):
    fs = ["--set", "train.parallel=fsdp", "--set", "decay.name=alphadecay", "--set", "decay.interval=4"]
    _run(["train"], 2, tmp_path / "fsdp", corpus_file, fs)
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=1e-6)
    full = _weights(tmp_path / "fsdp", sharded=True)
    _close(_weights(single), full)
    # the sharded checkpoint is readable in one process by `layerwise analyze`
    from layerwise.lab.cli import main

    assert main(["analyze", str(tmp_path / "fsdp"), "--no-plots"]) == 0
    rows = json.loads((tmp_path / "fsdp" / "spectral.json").read_text())["rows"]
    assert len(rows) == 14 and all(r["alpha"] is not None for r in rows)
    # sharded save at step 4, a new launch resumes from it: equals the uninterrupted run
    run = tmp_path / "resumed"
    _run(["train"], 2, run, corpus_file, fs + ["--set", "train.stop_at=4"])
    assert (run / "checkpoints" / "last.dcp" / ".metadata").exists() and not (run / "summary.json").exists()
    cmd_resume = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "layerwise",
        "train",
        "--resume",
        str(run),
        "--set",
        "train.stop_at=0",
    ]
    res = subprocess.run(
        cmd_resume, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    s3 = json.loads((run / "summary.json").read_text())
    assert s3["final_val_loss"] == pytest.approx(s2["final_val_loss"], rel=1e-6)
    _close(full, _weights(run, sharded=True))


def test_alphaadam_fsdp_equals_single_process(tmp_path, corpus_file):
    """AlphaAdam on FSDP2-sharded parameters: per-tensor statistics from local shards + one all-reduce."""
    extra = ["--set", "optim.name=alphaadam"]
    _run(["train"], 1, tmp_path / "one", corpus_file, extra)
    _run(["train"], 2, tmp_path / "two", corpus_file, extra + ["--set", "train.parallel=fsdp"])
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=1e-5)
    _close(_weights(tmp_path / "one"), _weights(tmp_path / "two", sharded=True), rtol=1e-3, atol=1e-5)


def test_multipliers_and_width_scaling_under_fsdp_equal_single_process(tmp_path, corpus_file):
    """Learnable multipliers (clipping without them) and muP width scaling, groups built after sharding."""
    extra = [
        "--set",
        "multipliers.kind=rowcol",
        "--set",
        "model.parametrization=mup",
        "--set",
        "model.base_hidden_size=16",
    ]
    _run(["train"], 1, tmp_path / "one", corpus_file, extra)
    _run(["train"], 2, tmp_path / "two", corpus_file, extra + ["--set", "train.parallel=fsdp"])
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["final_val_loss"] == pytest.approx(s1["final_val_loss"], rel=1e-6)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two", sharded=True)
    assert any(k.endswith("row_multiplier") for k in w2)
    _close(w1, w2, atol=1e-5)  # Adam divides by sqrt(v): reduction-order rounding shows up to ~2e-6 here
    # the merged export of the sharded run equals the single-process one
    m1 = torch.load(tmp_path / "one/checkpoints/merged.pt", weights_only=True)["model"]
    m2 = torch.load(tmp_path / "two/checkpoints/merged.pt", weights_only=True)["model"]
    _close(m1, m2, atol=1e-5)
