"""The floor under any Gram-eigenvalue α on the 56 llama-60m block matrices: the Gram products and a plain
loop of ``eigvalsh``, against ``gram_eigvals`` (minimum of 3 timed repeats each).

    PYTHONPATH=src python benchmarks/eigvalsh_floor.py
"""

import time

import numpy as np
import torch
from scipy.linalg.lapack import ssyevr

from layerwise.spectral import gram_eigvals


def best(f, n=3):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


torch.manual_seed(0)
shapes = [(512, 512)] * 4 + [(1376, 512), (1376, 512), (512, 1376)]
ws = [torch.randn(s) * 0.02 for _ in range(8) for s in shapes]
grams = [w.mT @ w if w.shape[0] > w.shape[1] else w @ w.mT for w in ws]
print(f"Gram products            {best(lambda: [w.mT @ w if w.shape[0] > w.shape[1] else w @ w.mT for w in ws]):.3f} s")
print(f"eigvalsh, loop           {best(lambda: [torch.linalg.eigvalsh(g) for g in grams]):.3f} s")
print(f"eigvalsh, one batch      {best(lambda: torch.linalg.eigvalsh(torch.stack(grams))):.3f} s")
print(f"numpy eigvalsh, loop     {best(lambda: [np.linalg.eigvalsh(g.numpy()) for g in grams]):.3f} s")
print(f"scipy ?syevr, loop       {best(lambda: [ssyevr(g.numpy(), compute_v=0) for g in grams]):.3f} s")
print(f"gram_eigvals (ours)      {best(lambda: gram_eigvals(ws)):.3f} s")
print(f"gram_eigvals torch solver {best(lambda: gram_eigvals(ws, solver='torch')):.3f} s")
