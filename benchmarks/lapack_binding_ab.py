"""Issue 18's rule for the ctypes LAPACK binding: analyze() with the GIL-free ctypes ``?syevr`` vs the same
analysis through SciPy's public f2py wrapper ``scipy.linalg.lapack.ssyevr`` over the same threads; and the
spectral headline: analyze() vs the AlphaDecay authors' way (one ``torch.linalg.svdvals`` per matrix + Hill).

The binding stays only if it is >= 1.3x faster end to end.  The three run in ONE process, interleaved in a
random order per round (none leaves state behind: spectral_speed.py's interference column is ~1.0 for them),
on the 56 llama-60m block matrices of spectral_speed.py; the figures are the medians of the per-round paired
ratios f2py / ctypes and svd / ctypes.

    PYTHONPATH=src python benchmarks/lapack_binding_ab.py [--rounds 12]

The two-thread advantage needs two free cores: on a loaded machine the ratio falls towards 1.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spectral_speed as S  # noqa: E402  (the benchmark's model builder and f2py switch)
from layerwise.spectral import analyze  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"load avg at start {os.getloadavg()}")
    for variant in ("init", "heavy"):
        model = S.build(variant)
        fns = {
            "ctypes": lambda m=model: analyze(m, solver="lapack"),
            "f2py": lambda m=model: S._f2py_analyze(m),
            "svd": lambda m=model: S.authors_way(m),
        }
        for fn in fns.values():
            fn()  # warm-up: thread pool, LAPACK workspace
        times: dict[str, list[float]] = {k: [] for k in fns}
        rng = random.Random(args.seed)
        for _ in range(args.rounds):
            order = list(fns)
            rng.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        for ref in ("f2py", "svd"):
            ratios = sorted(f / c for c, f in zip(times["ctypes"], times[ref]))
            print(
                f"{variant}: ctypes {med['ctypes']:.0f} ms, {ref} {med[ref]:.0f} ms (medians); {ref}/ctypes paired "
                f"ratio {statistics.median(ratios):.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}); "
                f"load {os.getloadavg()[0]:.2f}"
            )


if __name__ == "__main__":
    main()
