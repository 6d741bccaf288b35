"""The eigensolvers leave no process state behind that slows later torch kernels (issue 20, item 0).

Cause of the old slowdown: ``analyze(solver="torch")`` ran ``torch.linalg.eigvalsh`` from a Python thread
pool.  Each pool thread that enters torch's OpenMP code becomes the master of its own OpenMP team (new OS
threads that are not Python threads); once libgomp manages more threads than CPUs it "throttles" its spin
wait, so every later multi-region kernel (``svdvals``) of the process slept on futexes and ran ~3× slower.
The check is deterministic: after warming up the main thread's OpenMP team, no call of ``analyze`` /
``gram_eigvals`` may create OS threads that are not Python threads.  (No wall-clock is measured.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SRC = str(Path(__file__).resolve().parents[2] / "src")

_SCRIPT = r"""
import json, os, threading, torch
from torch import nn
from layerwise.spectral import analyze, gram_eigvals
torch.set_num_threads(2)

def foreign():  # OS threads of this process that Python did not start (OpenMP / BLAS workers)
    return set(os.listdir('/proc/self/task')) - {str(t.native_id) for t in threading.enumerate()}

torch.manual_seed(0)
m = nn.Sequential(*[nn.Linear(192, 192, bias=False) for _ in range(6)])
a = torch.randn(384, 384)
torch.linalg.svdvals(a); torch.linalg.eigvalsh(a @ a.T); a @ a   # the main thread's OpenMP team
analyze(m, select="linear")                                       # SciPy / OpenBLAS start their threads
before = foreign()
for solver in ("torch", "lapack", "auto"):
    analyze(m, select="linear", solver=solver, workers=2)
    gram_eigvals([p for p in m.parameters()], solver=solver, workers=2)
after = foreign()
print(json.dumps({"before": len(before), "new": sorted(after - before)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_eigensolvers_spawn_no_openmp_teams():
    env = dict(
        os.environ, PYTHONPATH=_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="2"
    )  # a 2-thread team per master even on a 1-core runner
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["new"] == [], (
        f"analyze/gram_eigvals started {len(out['new'])} non-Python OS threads (OpenMP teams of worker threads): {out}"
    )
