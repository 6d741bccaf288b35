"""Distributed costs of the methods (issue 8), on llama-60m shapes, CPU + gloo.

    PYTHONPATH=src python benchmarks/distributed.py [--ranks 1,2] [--rounds 3]

1. One AlphaDecay recomputation (`estimate_alphas` over the 56 block matrices) with 1 and 2 ranks: matrices
   are assigned to owner ranks balanced by eigen-solve cost, each owner analyses its share, one all-reduce
   of the alpha vector.  Weights are replicated (the DDP case), each rank limited to one thread so that 2
   ranks use the 2 cores.
2. AlphaAdam's communication per step under FSDP2: one all-reduce of 4 fp32 statistics per parameter
   tensor, counted from the parameter list (what `_step_sharded` stacks), against the parameter count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def block_matrices(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(512, 512)] * 4 + [(1376, 512), (1376, 512), (512, 1376)]
    return [torch.randn(s, generator=g) * 0.02 for _ in range(8) for s in shapes]


def _worker(rank: int, world: int, port: int, rounds: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from layerwise.decay.alphadecay import estimate_alphas

    ws = block_matrices()
    times = []
    for _ in range(rounds + 1):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        a = estimate_alphas(ws)["alpha"]
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out["time"] = statistics.median(times[1:])
        out["alpha0"] = float(a[0])
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results = {}
    for world in [int(x) for x in args.ranks.split(",")]:
        with mp.Manager() as m:
            out = m.dict()
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_worker, args=(world, port, args.rounds, out), nprocs=world, join=True)
            results[world] = dict(out)
        print(
            f"AlphaDecay recomputation, 56 llama-60m block matrices, {world} rank(s) x 1 thread: "
            f"{results[world]['time']:.3f} s (alpha[0] = {results[world]['alpha0']:.6f})",
            flush=True,
        )
    if 1 in results and 2 in results:
        print(f"2 ranks / 1 rank: {results[2]['time'] / results[1]['time']:.2f}x the time")

    from layerwise.lab.model import build_model

    model = build_model("llama-60m", vocab_size=32000)
    n_tensors = sum(1 for _ in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    stat_bytes = n_tensors * 4 * 4
    print(
        f"AlphaAdam under FSDP2: {n_tensors} tensors -> one all-reduce of {stat_bytes} bytes per step "
        f"({stat_bytes / (4 * n_params):.2e} of the fp32 parameter bytes, {n_params / 1e6:.1f}M parameters); "
        f"FSDP's own gradient reduce-scatter moves ~{4 * n_params / 1e6:.0f} MB per step"
    )


if __name__ == "__main__":
    main()
