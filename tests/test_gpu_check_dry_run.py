"""benchmarks/gpu_check.py --dry-run runs every section on CPU at tiny sizes and writes its JSON + table.

The compile section is left out here (dynamo tracing costs ~20 CPU-seconds; tests/lab/test_train_compile.py
covers the harness's compile path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--out",
            str(tmp_path),
            "--sections",
            "methods,optim,spectral,mfu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=880,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = data["rows"]
    assert data["info"]["dry_run"] is True
    assert {r["what"] for r in rows if r["section"] == "methods"} == {
        "adamw",
        "alphaadam",
        "cautious",
        "alphadecay",
        "multipliers",
        "muon",
        "scaling",
    }
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert all(r["tokens_per_s"] > 0 for r in rows if r["section"] in ("methods", "mfu"))
    spec = next(r for r in rows if r["section"] == "spectral")
    assert spec["max_rel_err"] < 1e-4
    assert {r["what"] for r in rows if r["section"] == "optim"} == {"adamw_fused", "alphaadam", "cautious"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| section | what | ok |" in md and "alphadecay" in md


def test_gpu_check_refuses_without_cuda_or_bad_section(tmp_path):
    import torch

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    if not torch.cuda.is_available():
        res = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True, env=env)
        assert res.returncode == 2 and "no CUDA device" in res.stderr
    res = subprocess.run(
        [sys.executable, script, "--dry-run", "--out", str(tmp_path), "--sections", "nope"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2 and "unknown section 'nope'" in res.stderr
