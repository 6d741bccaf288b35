"""Machinery shared by the weight-decay controllers: module selection, name resolution, group splitting,
optimizer-step counting.

Conventions (``docs/methods.md`` §0):

* Weight decay is PyTorch's coupled convention: one step does θ ← θ·(1 − lr·λ) for decoupled optimizers
  (``AdamW``, ``Muon``, AlphaAdam) or adds λ·θ to the gradient for torch ``Adam``'s L2.
* A controller counts optimizer steps itself with a step post-hook
  (``optimizer.register_step_post_hook``), so it is immune to schedulers stepped several times per step
  and to steps skipped by ``GradScaler`` (a skipped step runs no hook).
* Per-module metadata is keyed by canonical parameter name (:mod:`layerwise.names`); what a parameter is
  comes from :mod:`layerwise.anatomy`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise.names import canonical_name

Select = Union[None, str, "re.Pattern[str]", Callable[[str, torch.Tensor], bool], Iterable[str]]


# ----------------------------------------------------------------------------------------- selection


def controlled_matrices(
    model: nn.Module, select: Select = None, *, controller: str = "controller"
) -> list[tuple[str, torch.Tensor]]:
    """The (canonical name, parameter) pairs a weight-decay controller acts on.

    ``select``: ``None`` -> the trainable block matrices of :func:`layerwise.anatomy` (every 2-D weight inside
    a repeated block - ``nn.Linear`` or Hugging Face ``Conv1D``, q/k/v/o or fused qkv, gate/up/down, SSM
    in/out; on a model without blocks, every 2-D layer that is neither an embedding nor a readout); a regex
    (``str`` or compiled) -> trainable 2-D parameters whose canonical name it ``re.search``-matches; a callable
    ``(name, param) -> bool`` -> trainable parameters for which it returns true; an iterable of names ->
    exactly those parameters.  Every selected tensor must be 2-D.  Tied parameters count once.  Raises
    ``ValueError`` when nothing is selected.  With ``select=None``, trainable parameters the anatomy cannot
    classify (role ``other``) are listed in one warning (they keep their group's decay).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    an = _anatomy.anatomy(model)
    trainable = [r for r in an if r.trainable]
    if select is None:
        chosen = [(r.name, r.tensor) for r in an.block_matrices(trainable=True)]
        odd = [r for r in trainable if r.role == "other"]
        if odd:
            _anatomy.warn_once(
                f"{controller}:{','.join(r.name for r in odd)}",
                f"{controller}: {len(odd)} trainable parameter(s) cannot be classified and are not analysed "
                "(they keep their group's weight decay): "
                + ", ".join(f"{r.name} {list(r.shape)}" for r in odd[:8])
                + (" ..." if len(odd) > 8 else "")
                + "; pass select= (a regex, callable or list of names) to choose matrices yourself",
            )
    elif isinstance(select, (str, re.Pattern)):
        pat = re.compile(select) if isinstance(select, str) else select
        chosen = [(r.name, r.tensor) for r in trainable if r.ndim == 2 and any(pat.search(n) for n in r.names)]
    elif callable(select):
        chosen = [(r.name, r.tensor) for r in trainable if select(r.name, r.tensor)]
    else:
        wanted = [canonical_name(str(n)) for n in select]
        unknown = [n for n in wanted if an.get(n) is None or not an.get(n).trainable]
        if unknown:
            raise ValueError(f"select names parameter(s) not in the model (or not trainable): {unknown}")
        chosen = [(n, an.by_name(n).tensor) for n in wanted]
    seen: set[int] = set()
    out = []
    for n, p in chosen:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    bad = [f"{n} (shape {tuple(p.shape)})" for n, p in out if p.dim() != 2]
    if bad:
        raise ValueError(f"only 2-D weight matrices can be analysed; select picked {bad}")
    if not out:
        raise ValueError(
            "the model has no weight matrix to analyse (select matched nothing; default: the block matrices of "
            "layerwise.anatomy(model))"
        )
    return out


# ------------------------------------------------------------------------------------- group utilities


def param_locations(optimizer: torch.optim.Optimizer) -> dict[int, tuple[int, dict]]:
    """``id(param) -> (group index, group dict)`` over ``optimizer.param_groups``."""
    out: dict[int, tuple[int, dict]] = {}
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            out[id(p)] = (gi, g)
    return out


def check_in_optimizer(optimizer: torch.optim.Optimizer, matrices: list[tuple[str, torch.Tensor]]) -> None:
    """``ValueError`` naming every selected parameter that no group of ``optimizer`` holds."""
    if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "register_step_post_hook"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (with step hooks), got {type(optimizer).__name__}")
    loc = param_locations(optimizer)
    missing = [n for n, p in matrices if id(p) not in loc]
    if missing:
        raise ValueError(f"parameter(s) to analyse are not in the optimizer: {missing}")


def _stored_group_lists(optimizer: Any) -> list[list[dict]]:
    """Every ``param_groups`` *list object* stored on the optimizer or on optimizers it holds.

    A wrapper whose ``param_groups`` is a property concatenating inner optimizers' groups stores no list
    itself; its inner optimizers do, and rewriting those rewrites the wrapper's view.
    """
    lists: list[list[dict]] = []
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        d = getattr(obj, "__dict__", None)
        if not isinstance(d, dict):
            return
        pg = d.get("param_groups")
        if isinstance(pg, list) and all(id(pg) != id(x) for x in lists):
            lists.append(pg)
        for v in d.values():
            if isinstance(v, torch.optim.Optimizer) or hasattr(v, "param_groups"):
                visit(v, depth + 1)
            elif isinstance(v, (list, tuple)):
                for item in v:
                    if isinstance(item, torch.optim.Optimizer):
                        visit(item, depth + 1)
            elif isinstance(v, dict):
                for item in v.values():
                    if isinstance(item, torch.optim.Optimizer):
                        visit(item, depth + 1)

    visit(optimizer, 0)
    return lists


def split_groups(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict]:
    """Give each tensor in ``params`` its own parameter group; return those groups (same order).

    A group holding some of ``params`` and other tensors is replaced, at its position, by a group of
    the remaining tensors (same dict object, ``params``/``param_names`` filtered) followed by one new
    group per analysed tensor; each new group copies every other key of the original group (``lr``,
    ``weight_decay``, ``betas``, ``param_names`` entry, ``lr_scale``, ``group`` label ...).  A group
    already holding exactly one analysed tensor is kept as it is, so splitting is idempotent.

    Optimizer state is keyed by the parameter object, so it survives the split (before or after steps).
    ``optimizer.state_dict()`` lists groups by position: a checkpoint written after the split loads only
    into an optimizer split the same way (build the controller before ``optimizer.load_state_dict``).

    Must run before an LR scheduler is attached (schedulers record one base LR per group at creation):
    if a split is needed and a group already carries ``initial_lr``, raise ``ValueError``.
    """
    wanted = {id(p): i for i, p in enumerate(params)}
    result: list[dict | None] = [None] * len(params)
    plans: list[tuple[dict, list[int], list[dict]]] = []
    for g in optimizer.param_groups:
        hit = [i for i, p in enumerate(g["params"]) if id(p) in wanted]
        if not hit:
            continue
        if len(g["params"]) == 1:
            result[wanted[id(g["params"][0])]] = g
            continue
        if "initial_lr" in g:
            raise ValueError(
                "the optimizer already has an LR scheduler (param group key 'initial_lr'); create the "
                "weight-decay controller first, then the LR scheduler: the controller gives each analysed "
                "matrix its own parameter group"
            )
        pnames = g.get("param_names")
        new_groups = []
        keep = [i for i in range(len(g["params"])) if i not in set(hit)]
        for i in hit:
            ng = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            ng["params"] = [g["params"][i]]
            if pnames is not None:
                ng["param_names"] = [pnames[i]]
            new_groups.append(ng)
            result[wanted[id(g["params"][i])]] = ng
        plans.append((g, keep, new_groups))
    if not plans:
        return result  # type: ignore[return-value]
    lists = _stored_group_lists(optimizer)
    for g, keep, new_groups in plans:
        pnames = g.get("param_names")
        replaced = False
        for lst in lists:
            for pos, item in enumerate(lst):
                if item is g:
                    lst[pos : pos + 1] = ([g] if keep else []) + new_groups
                    replaced = True
                    break
        if not replaced:
            raise TypeError(
                f"cannot split the param groups of {type(optimizer).__name__}: no stored param_groups list "
                "holds the group; build the optimizer with one group per analysed matrix instead"
            )
        g["params"] = [g["params"][i] for i in keep]
        if pnames is not None:
            g["param_names"] = [pnames[i] for i in keep]
    # verify through the public view
    loc = param_locations(optimizer)
    for i, p in enumerate(params):
        _, g = loc.get(id(p), (None, None))
        if g is not result[i] or len(g["params"]) != 1:
            raise TypeError(
                f"splitting the param groups of {type(optimizer).__name__} did not take effect in "
                "optimizer.param_groups; build the optimizer with one group per analysed matrix instead"
            )
    return result  # type: ignore[return-value]


def resolve_wd0(groups: list[dict], wd0: float | str | None, names: list[str]) -> list[float]:
    """Base decay of each analysed module.

    ``wd0=None``: the ``weight_decay`` of the groups holding the analysed matrices, which must all be equal
    (``ValueError`` listing the values otherwise); ``wd0="group"``: each module's own group decay;
    a number: that value for every module.
    """
    if isinstance(wd0, str):
        if wd0 != "group":
            raise ValueError(f"wd0 must be a number, None or 'group'; got {wd0!r}")
        return [float(g["weight_decay"]) for g in groups]
    if wd0 is None:
        values = sorted({float(g.get("weight_decay", 0.0)) for g in groups})
        if len(values) != 1:
            example = {}
            for n, g in zip(names, groups):
                example.setdefault(float(g.get("weight_decay", 0.0)), n)
            shown = dict(list(example.items())[:4])
            raise ValueError(
                f"wd0 is ambiguous: the analysed matrices' groups have {len(values)} different weight_decay "
                f"values (e.g. {shown}); pass wd0=<number> or wd0='group'"
            )
        return [values[0]] * len(groups)
    wd0 = float(wd0)
    if not wd0 >= 0:
        raise ValueError(f"wd0 must be >= 0, got {wd0}")
    return [wd0] * len(groups)


# ------------------------------------------------------------------------------------------ controller


class DecayController:
    """Base class: counts optimizer steps with a step post-hook; subclasses override the hooks.

    Public attributes every controller has: ``step`` (optimizer steps seen), ``version`` (how many times
    the decays were (re)set; the trainer logs :meth:`table` when it changes), ``last_update_step``,
    ``interval`` (steps between updates: ``None`` = never after construction, ``1`` = every step).
    """

    name: str = "base"
    interval: int | None = None

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (with step hooks), got {type(optimizer).__name__}"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.step = 0
        self.version = 0
        self.last_update_step: int | None = None
        self._handles: list[Any] = []

    def current_groups(self, params: list[torch.Tensor]) -> list[dict]:
        """The group dict now holding each tensor.  Looked up every time: ``optimizer.load_state_dict``
        replaces the group dicts with new ones, so controllers never keep references to groups."""
        loc = param_locations(self.optimizer)
        try:
            return [loc[id(p)][1] for p in params]
        except KeyError:
            raise ValueError("a controlled parameter is no longer in the optimizer") from None

    def _attach(self) -> None:
        """Register the step hooks; subclasses call it last in ``__init__`` (no leaked hook on error)."""
        self._handles.append(self.optimizer.register_step_post_hook(self._post_hook))

    # hooks -------------------------------------------------------------------------------------------
    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step += 1
        self.after_step()

    def after_step(self) -> None:  # pragma: no cover - overridden
        pass

    def remove(self) -> None:
        """Detach the controller's hooks from the optimizer (decays already set stay as they are)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # interface ---------------------------------------------------------------------------------------
    def table(self) -> list[dict]:  # pragma: no cover - overridden
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"step": self.step, "version": self.version, "last_update_step": self.last_update_step}

    def load_state_dict(self, state: dict) -> None:
        for key in ("step", "version", "last_update_step"):
            if key not in state:
                raise ValueError(f"{type(self).__name__} state dict lacks key {key!r}")
        self.step = int(state["step"])
        self.version = int(state["version"])
        lus = state["last_update_step"]
        self.last_update_step = None if lus is None else int(lus)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step={self.step}, version={self.version})"
