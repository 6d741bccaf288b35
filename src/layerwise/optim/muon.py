"""Muon on the block matrices, AdamW on everything else, as one ``torch.optim.Optimizer``.

The standard split (Keller Jordan's Muon, Moonshot's "Muon is scalable"): ``torch.optim.Muon`` for the 2-D
weight matrices inside the transformer blocks (q/k/v/o, gate/up/down), ``torch.optim.AdamW`` for the token
embedding, the LM head, norms, biases and learnable multipliers (:mod:`layerwise.multipliers`, which are
vectors).  A parameter goes to Muon when :mod:`layerwise.anatomy` says it is a block matrix (a 2-D weight
inside a repeated block; :func:`is_muon_param`); a group may force its side with ``"use_muon": True/False``.

:class:`MuonAdamW` holds one inner ``Muon`` and one inner ``AdamW``.  Its ``param_groups`` are the inner
optimizers' group dicts themselves (Muon's first), so LR schedulers and weight-decay controllers that edit
``group["lr"]`` / ``group["weight_decay"]`` act on the inner optimizers; ``state`` is one dict shared by both;
``state_dict``/``load_state_dict``, ``zero_grad`` and step hooks are ``torch.optim.Optimizer``'s.  Every
group carries ``"use_muon"``.

Conventions: weight decay is PyTorch's coupled form on both sides, one step does ``θ ← θ·(1 − lr·λ)`` (Muon
applies it with the unadjusted lr).  ``adjust_lr_fn`` defaults to ``"match_rms_adamw"`` (Moonshot: update RMS
matched to AdamW's, ``lr · 0.2·sqrt(max(A, B))``), so one learning rate and weight decay tuned for AdamW can be
used on both sides; pass ``"original"`` (Keller: ``lr · sqrt(max(1, A/B))``, typical lr 0.02) with a separate
``adam_lr`` otherwise.

Sharded matrices (FSDP2): when the Muon-side parameters are ``DTensor`` shards (``Shard(d)`` on a 1-D device
mesh, as ``fully_shard`` makes them), :meth:`MuonAdamW.step` does not call ``torch.optim.Muon`` (whose
Newton–Schulz iteration needs whole matrices) but :func:`sharded_muon_step`: the momentum update is
element-wise and runs on the local shards; each matrix's update is then gathered (``dist.gather``) to **one
owner rank** (:func:`muon_owners`: balanced by Newton–Schulz cost, the same on every rank), orthogonalised
there once with the same arithmetic as ``torch.optim.Muon`` (:func:`newton_schulz`, in bfloat16), and its
rows are scattered back (``dist.scatter``) so every rank applies its own shard.  Since the iteration starts
by casting to bfloat16, both transfers move bfloat16: about ``2·m·n`` bytes gathered plus ``2·m·n`` scattered
per ``m×n`` matrix per step, in total over all ranks (never a full copy on every rank).  The state key is
torch Muon's ``"momentum_buffer"`` (a DTensor shaped like the parameter), so
``torch.distributed.checkpoint``'s ``get_state_dict`` / ``set_state_dict`` work unchanged.  Plain tensors
(one process, DDP) take the unchanged ``torch.optim.Muon`` path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import AdamW, Muon, Optimizer

from layerwise import anatomy as _anatomy
from layerwise.names import canonical_name


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """True for a block matrix (:mod:`layerwise.anatomy` role ``block_matrix``: a 2-D weight inside a
    repeated block; embeddings and the head are outside the blocks, so they go to AdamW).  From the name and
    shape alone; :func:`muon_param_groups` classifies a whole model at once."""
    return param.ndim == 2 and _anatomy.anatomy({canonical_name(name): param}).rows[0].role == "block_matrix"


_MUON_LABEL = {
    "block_matrix": "matrix",
    "embedding": "embedding",
    "position_embedding": "embedding",
    "input": "embedding",
    "readout": "readout",
    "multiplier": "multiplier",
}


def muon_param_groups(
    model: nn.Module, lr: float, weight_decay: float, *, multiplier_weight_decay: float = 2e-3
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`MuonAdamW` from a model (the layerwise group contract).

    Groups (empty ones omitted), each with ``params``, ``param_names``, ``lr``, ``weight_decay``, ``group``,
    ``use_muon``: ``"matrix"`` (block matrices, Muon, ``weight_decay``), ``"embedding"`` (embeddings, input
    layers) / ``"readout"`` / ``"other"`` (other ≥2-D tensors, AdamW, ``weight_decay``), ``"vector"``
    (vector-like: norms, biases, SSM vectors, depthwise convs: AdamW, no decay),
    ``"multiplier"`` (AdamW, ``multiplier_weight_decay``).
    """
    buckets: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for r in _anatomy.anatomy(model):
        if not r.trainable or r.tensor is None:
            continue
        label = _MUON_LABEL.get(r.role) or ("vector" if r.vector_like or r.ndim < 2 else "other")
        buckets.setdefault(label, []).append((r.name, r.tensor))
    decay = {"vector": 0.0, "multiplier": multiplier_weight_decay}
    groups = []
    for label in ("matrix", "embedding", "readout", "other", "vector", "multiplier"):
        if label in buckets:
            groups.append(
                {
                    "params": [p for _, p in buckets[label]],
                    "param_names": [n for n, _ in buckets[label]],
                    "lr": lr,
                    "weight_decay": decay.get(label, weight_decay),
                    "group": label,
                    "use_muon": label == "matrix",
                }
            )
    return groups


class MuonAdamW(Optimizer):
    """``torch.optim.Muon`` for block matrices + ``torch.optim.AdamW`` for the rest, as one optimizer.

    Args:
        params: a model (groups from :func:`muon_param_groups`), ``named_parameters()``-style pairs, or group
            dicts.  Routing needs names: pairs, or groups with ``"param_names"``; a group with
            ``"use_muon"`` set is routed as a whole without names.  Each group is split into a Muon part and an
            AdamW part that keep the group's keys (``lr``, ``weight_decay``, ``group``, ...); an optional
            per-group ``"adam_lr"`` sets the AdamW part's lr.
        lr: default lr for groups without ``"lr"`` (both sides).
        weight_decay: default coupled weight decay for groups without one (both sides).
        momentum, nesterov, ns_coefficients, ns_steps, muon_eps, adjust_lr_fn: ``torch.optim.Muon``'s.
        adam_betas, adam_eps: AdamW's ``betas``/``eps``.
        adam_lr: default lr of AdamW parts of groups without ``"lr"`` (None: ``lr``).
        adam_foreach, adam_fused: passed to AdamW.

    Raises:
        ValueError: parameters that cannot be routed (no names, no ``use_muon``), or an empty parameter list.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        adam_lr: float | None = None,
        *,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        ns_steps: int = 5,
        muon_eps: float = 1e-7,
        adjust_lr_fn: str | None = "match_rms_adamw",
        adam_foreach: bool | None = None,
        adam_fused: bool | None = None,
    ) -> None:
        self._ready = False
        groups = self._normalise(params, lr, weight_decay)
        muon_parts: list[dict[str, Any]] = []
        adam_parts: list[dict[str, Any]] = []
        for g in groups:
            m, a = self._split(g)
            if m is not None:
                muon_parts.append(m)
            if a is not None:
                adam_parts.append(a)
        if not muon_parts and not adam_parts:
            raise ValueError("MuonAdamW got an empty parameter list")
        self._muon_kwargs: dict[str, Any] = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=muon_eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        self._adam_kwargs: dict[str, Any] = dict(
            lr=adam_lr if adam_lr is not None else lr,
            betas=adam_betas,
            eps=adam_eps,
            weight_decay=weight_decay,
            foreach=adam_foreach,
            fused=adam_fused,
        )
        self._muon: Muon | None = Muon(muon_parts, **self._muon_kwargs) if muon_parts else None
        self._adamw: AdamW | None = AdamW(adam_parts, **self._adam_kwargs) if adam_parts else None
        inner = (self._muon.param_groups if self._muon else []) + (self._adamw.param_groups if self._adamw else [])
        super().__init__(inner, {"lr": lr, "weight_decay": weight_decay})
        self._link()
        self._ready = True

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _normalise(params: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        if isinstance(params, nn.Module):
            return muon_param_groups(params, lr, weight_decay)
        if isinstance(params, torch.Tensor):
            raise TypeError("MuonAdamW params must be a model, an iterable of (name, tensor) pairs, or group dicts")
        items = list(params)
        if not items:
            raise ValueError("MuonAdamW got an empty parameter list")
        if all(isinstance(x, dict) for x in items):
            return [dict(x) for x in items]
        return [{"params": items}]

    @staticmethod
    def _split(group: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        raw = group["params"]
        raw = [raw] if isinstance(raw, torch.Tensor) else list(raw)
        params: list[torch.Tensor] = []
        names: list[str] | None = list(group["param_names"]) if "param_names" in group else None
        pair_names: list[str] = []
        for x in raw:
            if isinstance(x, tuple):
                pair_names.append(canonical_name(x[0]))
                params.append(x[1])
            else:
                params.append(x)
        if pair_names:
            if len(pair_names) != len(params):
                raise ValueError("MuonAdamW: a group mixes named and unnamed parameters")
            names = pair_names
        if names is not None and len(names) != len(params):
            raise ValueError(
                f"MuonAdamW: group {group.get('group', '?')!r} has {len(params)} params but {len(names)} param_names"
            )
        if "use_muon" in group:
            side = [bool(group["use_muon"])] * len(params)
        elif names is None:
            raise ValueError(
                "MuonAdamW needs parameter names to route parameters between Muon and AdamW: pass a model, "
                "model.named_parameters(), groups with 'param_names', or set 'use_muon' on each group"
            )
        else:
            side = [is_muon_param(n, p) for n, p in zip(names, params)]
        base = {k: v for k, v in group.items() if k not in ("params", "param_names", "adam_lr")}
        out: list[dict[str, Any] | None] = []
        for want in (True, False):
            idx = [i for i, s in enumerate(side) if s == want]
            if not idx:
                out.append(None)
                continue
            part = dict(base, params=[params[i] for i in idx], use_muon=want)
            if names is not None:
                part["param_names"] = [names[i] for i in idx]
            if not want and "adam_lr" in group:
                part["lr"] = group["adam_lr"]
            out.append(part)
        return out[0], out[1]

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's group dicts and shared state."""
        muon_groups = [g for g in self.param_groups if g["use_muon"]]
        adam_groups = [g for g in self.param_groups if not g["use_muon"]]
        if self._muon is None and muon_groups:
            self._muon = Muon([dict(g) for g in muon_groups], **self._muon_kwargs)
        if self._adamw is None and adam_groups:
            self._adamw = AdamW([dict(g) for g in adam_groups], **self._adam_kwargs)
        if self._muon is not None:
            self._muon.param_groups = muon_groups
            self._muon.state = self.state
        if self._adamw is not None:
            self._adamw.param_groups = adam_groups
            self._adamw.state = self.state

    # ------------------------------------------------------------------ Optimizer API
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Route a new group (split into Muon and AdamW parts) to the inner optimizers."""
        if not getattr(self, "_ready", False):
            super().add_param_group(param_group)
            return
        muon_part, adam_part = self._split(dict(param_group))
        for part, inner_name in ((muon_part, "_muon"), (adam_part, "_adamw")):
            if part is None:
                continue
            inner = getattr(self, inner_name)
            if inner is None:
                cls, kw = (Muon, self._muon_kwargs) if part["use_muon"] else (AdamW, self._adam_kwargs)
                inner = cls([part], **kw)
                setattr(self, inner_name, inner)
                inner.state = self.state
                part = inner.param_groups[0]
            else:
                inner.add_param_group(part)
                part = inner.param_groups[-1]
            super().add_param_group(part)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Muon step on the matrices and one AdamW step on the rest (closure evaluated once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._muon is not None:
            if has_sharded_params(self._muon):
                sharded_muon_step(self._muon)
            else:
                self._muon.step()
        if self._adamw is not None:
            self._adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @property
    def muon(self) -> Muon | None:
        """The inner ``torch.optim.Muon`` (None when no parameter goes to Muon)."""
        return self._muon

    @property
    def adamw(self) -> AdamW | None:
        """The inner ``torch.optim.AdamW`` (None when every parameter goes to Muon)."""
        return self._adamw


# ---------------------------------------------------------------------------------------------- sharded Muon
def newton_schulz(update: torch.Tensor, ns_coefficients: Sequence[float], ns_steps: int, eps: float) -> torch.Tensor:
    """Approximate orthogonalisation of a 2-D matrix by the quintic Newton–Schulz iteration, in bfloat16.

    The same arithmetic, op for op, as ``torch.optim.Muon`` (so a matrix gives bit-identical results): cast to
    bfloat16, work on the wide orientation (transpose when rows > columns), divide by the Frobenius norm
    (clamped below by ``eps``), then ``ns_steps`` times ``X ← a·X + (b·G + c·G²)·X`` with ``G = X·Xᵀ``.
    Returns a bfloat16 matrix of ``update``'s shape.
    """
    if update.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(update.shape)}")
    if len(ns_coefficients) != 3:
        raise ValueError(f"ns_coefficients must be 3 numbers (a, b, c), got {tuple(ns_coefficients)}")
    if not 0 <= ns_steps < 100:
        raise ValueError(f"ns_steps must be in [0, 100), got {ns_steps}")
    a, b, c = ns_coefficients
    tall = update.size(0) > update.size(1)
    x = update.bfloat16()
    if x is update:  # already bfloat16: do not scale the caller's tensor in place
        x = x.clone()
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """Muon's shape-dependent learning rate for an ``A×B`` matrix, as ``torch.optim.Muon``: ``"original"`` /
    None: ``lr·sqrt(max(1, A/B))``; ``"match_rms_adamw"``: ``lr·0.2·sqrt(max(A, B))``."""
    rows, cols = int(shape[0]), int(shape[1])
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


def muon_owners(shapes: Sequence[Sequence[int]], world_size: int) -> list[int]:
    """Owner rank (0 … ``world_size``−1) of each matrix for the sharded Newton–Schulz step: a greedy balance
    of the iteration's cost ``min(m, n)²·max(m, n)`` (:func:`layerwise._sharding.owner_ranks`), the same on
    every rank."""
    from layerwise._sharding import owner_ranks

    return owner_ranks(shapes, world_size)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local") and hasattr(t, "device_mesh")


def has_sharded_params(muon: Optimizer) -> bool:
    """True when some parameter of ``muon`` is a DTensor with a non-replicated placement (e.g. FSDP2)."""
    for group in muon.param_groups:
        for p in group["params"]:
            if _is_dtensor(p) and not all(pl.is_replicate() for pl in p.placements):
                return True
    return False


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (an alias: in-place ops write through), or ``t`` itself."""
    return cast(Any, t).to_local() if _is_dtensor(t) else t


def _shard_dim(t: torch.Tensor, name: str) -> int | None:
    """The sharded dim of a DTensor on a 1-D mesh (None: replicated, or a plain tensor)."""
    if not _is_dtensor(t):
        return None
    p: Any = t  # a DTensor
    if p.device_mesh.ndim != 1 or len(p.placements) != 1:
        raise NotImplementedError(
            f"MuonAdamW: parameter {name} is a DTensor on a {p.device_mesh.ndim}-D mesh with placements "
            f"{p.placements}; only 1-D meshes (FSDP2 fully_shard) are supported"
        )
    pl = p.placements[0]
    if pl.is_replicate():
        return None
    if not pl.is_shard():
        raise NotImplementedError(f"MuonAdamW: parameter {name} has unsupported placement {pl}")
    return pl.dim % p.ndim


def _chunk_rows(n: int, world: int) -> tuple[int, list[int]]:
    """``torch.chunk`` split of ``n`` rows over ``world`` ranks: (rows per full chunk, rows of each rank)."""
    size = -(-n // world)
    return size, [max(0, min(size, n - r * size)) for r in range(world)]


def sharded_muon_step(muon: Optimizer) -> None:
    """One ``torch.optim.Muon`` step for DTensor (FSDP2-sharded) parameters, Newton–Schulz once per matrix.

    ``muon`` is a ``torch.optim.Muon`` (its ``param_groups`` hyper-parameters and ``state`` are used).  The
    momentum (``state["momentum_buffer"]``, a DTensor like the gradient: ``B ← μ·B + (1−μ)·g``; Nesterov
    ``U = (1−μ)·g + μ·B``, else ``U = B``) runs on local shards; ``U`` is cast to bfloat16 and gathered to its
    owner (:func:`muon_owners`), orthogonalised there (:func:`newton_schulz`), and scattered back; every rank
    then applies ``θ ← θ·(1 − lr·λ) − lr_adj·O`` to its shard (coupled decay with the unadjusted lr,
    :func:`adjusted_lr`).  Replicated DTensors and plain tensors are updated locally.  A collective: every rank
    of the mesh must call it, with gradients on the same parameters.
    """
    # 1. momentum on local shards; collect the update of every parameter with a gradient
    jobs: list[dict[str, Any]] = []
    for group in muon.param_groups:
        lr = group["lr"]
        lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
        mom = float(group["momentum"])
        names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
        for p, name in zip(group["params"], names):
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError(f"MuonAdamW: Muon does not support complex parameters ({name})")
            if p.grad.is_sparse:
                raise RuntimeError(f"MuonAdamW: Muon does not support sparse gradients ({name})")
            if p.ndim != 2:
                raise ValueError(f"MuonAdamW: Muon parameter {name} must be 2-D, got shape {tuple(p.shape)}")
            state = muon.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            g, buf = _local(p.grad), _local(state["momentum_buffer"])
            if g.shape != _local(p).shape or buf.shape != g.shape:
                raise RuntimeError(
                    f"MuonAdamW: parameter {name}: local shard {tuple(_local(p).shape)}, gradient {tuple(g.shape)} "
                    f"and momentum buffer {tuple(buf.shape)} differ (placements must match)"
                )
            buf.lerp_(g, 1 - mom)
            update = g.lerp(buf, mom) if group["nesterov"] else buf
            jobs.append({"p": p, "group": group, "lr": lr, "update": update, "dim": _shard_dim(p, name), "name": name})

    # 2. sharded matrices: gather bfloat16 updates to owners (per process group, in parameter order)
    by_pg: dict[int, list[dict[str, Any]]] = {}
    pgs: dict[int, Any] = {}
    for j in jobs:
        if j["dim"] is None:
            continue
        mesh = j["p"].device_mesh
        if mesh.size() == 1:  # one rank: the local shard is the whole matrix
            j["dim"] = None
            continue
        pg = mesh.get_group()
        pgs[id(pg)] = pg
        by_pg.setdefault(id(pg), []).append(j)
    for key, js in by_pg.items():
        pg = pgs[key]
        world, me = dist.get_world_size(pg), dist.get_rank(pg)
        own = muon_owners([tuple(j["p"].shape) for j in js], world)
        works = []
        for j, o in zip(js, own):
            d = j["dim"]
            local = j["update"].bfloat16().movedim(d, 0)
            size, rows = _chunk_rows(j["p"].shape[d], world)
            if local.shape[0] != rows[me]:
                raise RuntimeError(
                    f"MuonAdamW: parameter {j['name']} has {local.shape[0]} rows along dim {d} on rank {me}; "
                    f"expected torch.chunk's {rows[me]}"
                )
            send = local.new_zeros((size,) + tuple(local.shape[1:]))
            send[: local.shape[0]] = local
            send = send.view(torch.uint8)  # data movement only: every backend moves bytes
            recv = [torch.empty_like(send) for _ in range(world)] if me == o else None
            j.update(owner=o, size=size, rows=rows, recv=recv, local_rows=local.shape[0])
            works.append(dist.gather(send, recv, dst=dist.get_global_rank(pg, o), group=pg, async_op=True))
        for w in works:
            w.wait()
        # 3. owners orthogonalise their matrices once; 4. rows scattered back
        works = []
        for j in js:
            d, size, rows = j["dim"], j["size"], j["rows"]
            g = j["group"]
            if me == j["owner"]:
                full = torch.cat([b.view(torch.bfloat16)[:r] for b, r in zip(j["recv"], rows)])
                full = full.movedim(0, d).contiguous()
                ortho = newton_schulz(full, g["ns_coefficients"], g["ns_steps"], g["eps"]).movedim(d, 0)
                chunks = []
                for r, n in enumerate(rows):
                    c = ortho.new_zeros((size,) + tuple(ortho.shape[1:]))
                    c[:n] = ortho[r * size : r * size + n]
                    chunks.append(c.view(torch.uint8))
                j["recv"] = None
            else:
                chunks = None
            out = torch.empty(
                (size,) + tuple(j["update"].movedim(d, 0).shape[1:]), dtype=torch.bfloat16, device=j["update"].device
            ).view(torch.uint8)
            j["out"] = out
            works.append(dist.scatter(out, chunks, src=dist.get_global_rank(pg, j["owner"]), group=pg, async_op=True))
        for w in works:
            w.wait()
        for j in js:
            j["ortho"] = j.pop("out").view(torch.bfloat16)[: j["local_rows"]].movedim(0, j["dim"])

    # 5. every rank applies its shard (coupled decay with the unadjusted lr, as torch.optim.Muon)
    for j in jobs:
        g = j["group"]
        step: torch.Tensor | None = j.get("ortho")
        if step is None:  # replicated / plain / one-rank mesh: the whole matrix is here
            step = newton_schulz(j["update"], g["ns_coefficients"], g["ns_steps"], g["eps"])
        p = _local(j["p"])
        p.mul_(1 - j["lr"] * g["weight_decay"])
        p.add_(step, alpha=-adjusted_lr(j["lr"], g["adjust_lr_fn"], j["p"].shape))


__all__ = [
    "MuonAdamW",
    "muon_param_groups",
    "is_muon_param",
    "sharded_muon_step",
    "newton_schulz",
    "adjusted_lr",
    "muon_owners",
    "has_sharded_params",
]
