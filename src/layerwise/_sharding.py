"""Helpers shared by the distributed paths of the library (AlphaDecay spectra, sharded Muon)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


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


def global_norms(tensors: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """The L2 norm of each whole tensor, as a float32 vector on ``device``.

    Plain tensors are reduced locally.  DTensors (FSDP2 shards, or any placement) are reduced over their
    mesh: their per-shard norms are stacked and turned into full values with one collective per
    (mesh, placements) combination — not one per tensor — so every rank must call this with the same tensors
    in the same order, as it does inside an optimizer step.  (``torch._foreach_norm`` on DTensors alone gives
    partial values, and arithmetic that mixes them with plain tensors raises.)
    """
    if not any(hasattr(t, "placements") for t in tensors):  # the usual case: no index bookkeeping
        if not tensors:
            return torch.zeros(0, dtype=torch.float32, device=device)
        return torch.stack([n.to(device, torch.float32) for n in torch._foreach_norm(list(tensors))])
    out = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    plain: list[int] = []
    sharded: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if hasattr(t, "placements") and hasattr(t, "full_tensor"):
            d: Any = t
            sharded.setdefault((id(d.device_mesh), tuple(d.placements)), []).append(i)
        else:
            plain.append(i)
    if plain:
        norms = torch._foreach_norm([tensors[i] for i in plain])
        out[plain] = torch.stack([n.to(device, torch.float32) for n in norms])
    for idx in sharded.values():
        norms = torch._foreach_norm([tensors[i] for i in idx])  # partial (per-shard) norms
        full: Any = torch.stack([n.float() for n in norms])  # still partial: one reduction below
        out[idx] = full.full_tensor().to(device, torch.float32)
    return out
