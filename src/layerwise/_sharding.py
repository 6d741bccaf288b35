"""Helpers shared by the distributed paths of the library (AlphaDecay spectra, sharded Muon)."""

from __future__ import annotations

from collections.abc import Sequence


def owner_ranks(shapes: Sequence[Sequence[int]], world_size: int) -> list[int]:
    """Owner rank (0 … ``world_size``−1) of each matrix for whole-matrix work done once per matrix.

    Greedy longest-processing-time balance of ``min(m, n)²·max(m, n)`` per ``m×n`` matrix — the cost of a Gram
    product + eigen-solve and of a Newton–Schulz iteration alike — with ties broken by index and by the lower
    rank, so the result depends only on the shapes and is the same on every rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    cost = [float(min(s[0], s[1])) ** 2 * max(s[0], s[1]) for s in shapes]
    load = [0.0] * world_size
    out = [0] * len(cost)
    for i in sorted(range(len(cost)), key=lambda i: (-cost[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += cost[i]
    return out
