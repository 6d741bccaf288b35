"""Muon on the block matrices, AdamW on everything else, as one ``torch.optim.Optimizer``.

The standard split (Keller Jordan's Muon, Moonshot's "Muon is scalable"): ``torch.optim.Muon`` for the 2-D
weight matrices inside the transformer blocks (q/k/v/o, gate/up/down), ``torch.optim.AdamW`` for the token
embedding, the LM head, norms, biases and learnable multipliers (:mod:`layerwise.multipliers`, which are
vectors).  A parameter goes to Muon when its canonical name is inside a block
(:func:`layerwise.names.layer_index` is not ``None``), it is 2-D, and it is not a multiplier
(:func:`is_muon_param`); a group may force its side with ``"use_muon": True/False``.

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
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim import AdamW, Muon, Optimizer

from layerwise.names import canonical_name, is_multiplier, layer_index, module_type
from layerwise.names import named_parameters as _named_parameters


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """True for a 2-D, non-multiplier parameter inside a transformer block (embeddings and the head are
    outside the blocks, so they go to AdamW)."""
    return param.ndim == 2 and layer_index(name) is not None and not is_multiplier(name)


def muon_param_groups(
    model: nn.Module, lr: float, weight_decay: float, *, multiplier_weight_decay: float = 2e-3
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`MuonAdamW` from a model (the layerwise group contract).

    Groups (empty ones omitted), each with ``params``, ``param_names``, ``lr``, ``weight_decay``, ``group``,
    ``use_muon``: ``"matrix"`` (block matrices, Muon, ``weight_decay``), ``"embedding"`` / ``"readout"`` /
    ``"other"`` (other ≥2-D tensors, AdamW, ``weight_decay``), ``"vector"`` (norms, biases: AdamW, no decay),
    ``"multiplier"`` (AdamW, ``multiplier_weight_decay``).
    """
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in _named_parameters(model):
        if is_multiplier(name):
            label = "multiplier"
        elif is_muon_param(name, p):
            label = "matrix"
        elif p.ndim < 2:
            label = "vector"
        else:
            label = {"embed": "embedding", "head": "readout"}.get(module_type(name), "other")
        buckets.setdefault(label, []).append((name, p))
    decay = {"vector": 0.0, "multiplier": multiplier_weight_decay}
    groups = []
    for label in ("matrix", "embedding", "readout", "other", "vector", "multiplier"):
        if label in buckets:
            groups.append({
                "params": [p for _, p in buckets[label]],
                "param_names": [n for n, _ in buckets[label]],
                "lr": lr,
                "weight_decay": decay.get(label, weight_decay),
                "group": label,
                "use_muon": label == "matrix",
            })
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
        self._muon_kwargs = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=muon_eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        )
        self._adam_kwargs = dict(
            lr=adam_lr if adam_lr is not None else lr, betas=adam_betas, eps=adam_eps, weight_decay=weight_decay,
            foreach=adam_foreach, fused=adam_fused,
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
                f"MuonAdamW: group {group.get('group', '?')!r} has {len(params)} params but "
                f"{len(names)} param_names"
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


__all__ = ["MuonAdamW", "muon_param_groups", "is_muon_param"]
