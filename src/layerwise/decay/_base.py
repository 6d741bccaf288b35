"""Machinery shared by the weight-decay controllers: module selection, the group-layout check, base decays,
optimizer-step counting.

Conventions (``docs/methods.md`` §0):

* Weight decay is PyTorch's coupled convention: one step does θ ← θ·(1 − lr·λ) for decoupled optimizers
  (``AdamW``, ``Muon``, AlphaAdam) or adds λ·θ to the gradient for torch ``Adam``'s L2.  Controllers only
  write ``group["weight_decay"]``; the optimizer applies it.
* Controllers never restructure an optimizer.  One that sets a decay per matrix needs each matrix it controls
  in a parameter group of its own; :func:`layerwise.param_groups` makes that layout (``per_matrix=``), and
  :func:`check_layout` raises :class:`GroupLayoutError` (showing that call) for any other.
* A controller records each group's base decay once, under ``group["initial_weight_decay"]`` (as torch's LR
  schedulers record ``initial_lr``), so the key travels with ``optimizer.state_dict()`` and a controller
  built after ``optimizer.load_state_dict`` still knows the base decay.
* A controller counts optimizer steps itself with a step post-hook
  (``optimizer.register_step_post_hook``), so it is immune to schedulers stepped several times per step
  and to steps skipped by ``GradScaler`` (a skipped step runs no hook).
* Per-module metadata is keyed by canonical parameter name (:mod:`layerwise.names`); what a parameter is
  comes from :mod:`layerwise.anatomy`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise import names as _names
from layerwise.names import canonical_name

Select = Union[None, str, "re.Pattern[str]", Callable[[str, torch.Tensor], bool], Iterable[str]]
#: what ``param_groups(per_matrix=...)`` and the controllers' layouts take: ``True`` (or ``"blocks"``) = the
#: block matrices of the anatomy, ``"authors"`` = the AlphaDecay authors' module set (each matrix with its
#: module's bias), anything else = a ``select`` of :func:`controlled_matrices`; ``False`` = no per-matrix groups
PerMatrix = bool | Select

#: the group key under which a controller records a group's base weight decay (cf. torch's ``initial_lr``)
INITIAL_WEIGHT_DECAY = "initial_weight_decay"


class GroupLayoutError(ValueError):
    """A weight-decay controller cannot set its decays: a tensor it controls shares a parameter group with
    tensors it does not (a group has one ``weight_decay``).  The message names the tensors and shows the
    :func:`layerwise.param_groups` call that builds the layout the controller needs."""


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
    chosen: list[tuple[str, torch.Tensor]]
    if select is None:
        chosen = [(r.name, r.tensor) for r in an.block_matrices(trainable=True) if r.tensor is not None]
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
        chosen = [
            (r.name, r.tensor)
            for r in trainable
            if r.ndim == 2 and r.tensor is not None and any(pat.search(n) for n in r.names)
        ]
    elif callable(select):
        chosen = [(r.name, r.tensor) for r in trainable if r.tensor is not None and select(r.name, r.tensor)]
    else:
        wanted = [canonical_name(str(n)) for n in select]
        rows = {n: an.get(n) for n in wanted}
        unknown = [n for n, r in rows.items() if r is None or not r.trainable or r.tensor is None]
        if unknown:
            raise ValueError(f"select names parameter(s) not in the model (or not trainable): {unknown}")
        chosen = [(n, r.tensor) for n, r in rows.items() if r is not None and r.tensor is not None]
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


def authors_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The AlphaDecay authors' module set: every ``nn.Linear`` of ``model`` in ``named_modules()`` order except
    the first and the last (on a LLaMA: all block matrices but layer 0's ``q_proj``, and not ``lm_head``).

    Returns ``(canonical module name, module)`` pairs.  ``ValueError`` when the model has fewer than three
    ``nn.Linear`` modules (nothing would be left).
    """
    lins = [
        (canonical_name(n), m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or getattr(m, "_layerwise_linear", False)
    ]
    if len(lins) < 3:
        raise ValueError(
            f"modules='authors' analyses every nn.Linear except the first and the last; the model has "
            f"{len(lins)} nn.Linear module(s), so none is left to analyse"
        )
    return lins[1:-1]


@dataclass(frozen=True, eq=False)
class Controlled:
    """One matrix a controller sets a decay for, and (``modules="authors"``) its module's bias, which takes
    the same decay.  Names are canonical."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    bias_name: str | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


def controlled_units(
    model: nn.Module, per_matrix: PerMatrix = True, *, controller: str = "controller"
) -> list[Controlled]:
    """The matrices that get a parameter group (and a decay) of their own, for ``per_matrix``:

    * ``True`` or ``"blocks"``: the block matrices of :func:`layerwise.anatomy` (the default of AlphaDecay,
      TypeDecay, AdaDecay);
    * ``"authors"``: the weights of :func:`authors_modules`, each with its module's bias (trainable ones only);
    * anything else: ``controlled_matrices(model, per_matrix)`` (a regex, a callable or a list of names).
    """
    if per_matrix is False or per_matrix is None:
        raise ValueError("per_matrix=False selects no matrix")
    if per_matrix is True or per_matrix == "blocks":
        return [Controlled(n, p) for n, p in controlled_matrices(model, None, controller=controller)]
    if isinstance(per_matrix, str) and per_matrix == "authors":
        name_of = {id(p): n for n, p in _names.named_parameters(model)}
        out = []
        for _, mod in authors_modules(model):
            w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
            if not isinstance(w, torch.Tensor) or id(w) not in name_of or w.dim() != 2:
                continue  # frozen: not controlled
            b = b if isinstance(b, torch.Tensor) and id(b) in name_of else None
            out.append(Controlled(name_of[id(w)], w, b, None if b is None else name_of[id(b)]))
        return out
    return [Controlled(n, p) for n, p in controlled_matrices(model, per_matrix, controller=controller)]


def per_matrix_text(per_matrix: PerMatrix) -> str:
    """``per_matrix`` as it would be written in a call (for error messages)."""
    if per_matrix is True or isinstance(per_matrix, (str, re.Pattern)):
        text = repr(per_matrix)
        return text if len(text) <= 160 else "<the select you passed>"
    if isinstance(per_matrix, (list, tuple)) and len(repr(per_matrix)) <= 160:
        return repr(per_matrix)
    return "<the select you passed>"


# ------------------------------------------------------------------------------------- group utilities


def param_locations(optimizer: torch.optim.Optimizer) -> dict[int, tuple[int, dict]]:
    """``id(param) -> (group index, group dict)`` over ``optimizer.param_groups``."""
    out: dict[int, tuple[int, dict]] = {}
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            out[id(p)] = (gi, g)
    return out


def check_optimizer(optimizer: Any) -> None:
    if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "register_step_post_hook"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (with step hooks), got {type(optimizer).__name__}")


def check_in_optimizer(optimizer: torch.optim.Optimizer, units: Sequence[Controlled]) -> None:
    """``ValueError`` naming every controlled tensor that no group of ``optimizer`` holds."""
    check_optimizer(optimizer)
    loc = param_locations(optimizer)
    missing = [u.name for u in units if id(u.weight) not in loc]
    missing += [f"{u.bias_name} (bias of {u.name})" for u in units if u.bias is not None and id(u.bias) not in loc]
    if missing:
        raise ValueError(f"parameter(s) to analyse are not in the optimizer: {missing}")


def check_layout(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    units: Sequence[Controlled],
    per_matrix: PerMatrix,
    controller: str,
) -> None:
    """Check that every controlled tensor is in ``optimizer``, in a group that holds nothing but tensors of its
    own :class:`Controlled` (the matrix, or the matrix and its bias: one group or one each).

    ``ValueError`` for a tensor the optimizer lacks; :class:`GroupLayoutError` for a shared group, naming the
    tensors and showing ``param_groups(model, ..., per_matrix=<per_matrix>)``, which builds the layout.
    """
    check_in_optimizer(optimizer, units)
    unit_of = {id(t): i for i, u in enumerate(units) for t in u.tensors}
    loc = param_locations(optimizer)
    shared: list[tuple[str, int, list[torch.Tensor]]] = []
    for i, u in enumerate(units):
        for t, tname in zip(u.tensors, (u.name, u.bias_name)):
            gi, g = loc[id(t)]
            others = [p for p in g["params"] if unit_of.get(id(p)) != i]
            if others:
                shared.append((str(tname), gi, others))
                break
    if not shared:
        return
    name_of = {id(p): n for n, p in _names.named_parameters(model, trainable_only=False)}
    tname, gi, others = shared[0]
    listed = ", ".join(name_of.get(id(p), f"<tensor {tuple(p.shape)}>") for p in others[:4])
    listed += ", ..." if len(others) > 4 else ""
    opt = type(optimizer).__name__
    with_bias = any(v.bias is not None for v in units)
    raise GroupLayoutError(
        f"{controller} sets one weight decay per matrix, so each matrix it controls needs a parameter group of its "
        f"own{' (shared at most with its bias)' if with_bias else ''}; {len(shared)} of its {len(units)} matrices "
        f"share a group, e.g. group {gi} of the {opt} holds {tname} together with {len(others)} other tensor(s) "
        f"({listed}).  Controllers do not regroup an optimizer: build it from per-matrix groups, "
        f"{opt}(layerwise.param_groups(model, lr=..., weight_decay=..., per_matrix={per_matrix_text(per_matrix)}), "
        "...)"
    )


def layout_units(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    per_matrix: PerMatrix,
    controller: str,
    keep: Callable[[Controlled], bool] | None = None,
) -> list[Controlled]:
    """:func:`controlled_units` (those ``keep`` accepts) after :func:`check_layout` of ``optimizer`` for them."""
    units = [u for u in controlled_units(model, per_matrix, controller=controller) if keep is None or keep(u)]
    if units:
        check_layout(optimizer, model, units, per_matrix, controller)
    return units


def base_decay(group: dict) -> float:
    """The group's base weight decay: ``initial_weight_decay`` if a controller recorded it, else ``weight_decay``."""
    return float(group.get(INITIAL_WEIGHT_DECAY, group.get("weight_decay", 0.0)))


def resolve_wd0(groups: list[dict], wd0: float | str | None, names: list[str]) -> list[float]:
    """Base decay of each controlled module (from :func:`base_decay` of its group).

    ``wd0=None``: the groups' base decays, which must all be equal (``ValueError`` listing the values
    otherwise); ``wd0="group"``: each module's own group's base decay; a number: that value for every module.
    """
    if isinstance(wd0, str):
        if wd0 != "group":
            raise ValueError(f"wd0 must be a number, None or 'group'; got {wd0!r}")
        return [base_decay(g) for g in groups]
    if wd0 is None:
        values = sorted({base_decay(g) for g in groups})
        if len(values) != 1:
            example: dict[float, str] = {}
            for n, g in zip(names, groups):
                example.setdefault(base_decay(g), n)
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
        check_optimizer(optimizer)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.step = 0
        self.version = 0
        self.last_update_step: int | None = None
        self._handles: list[Any] = []

    @classmethod
    def per_matrix_for(cls, **options: Any) -> PerMatrix:
        """The ``per_matrix`` argument of :func:`layerwise.param_groups` whose layout this controller, built with
        keyword ``options``, needs; ``False``: any layout (it sets no per-matrix decay)."""
        return False

    def current_groups(self, params: Sequence[torch.Tensor]) -> list[dict]:
        """The group dict now holding each tensor.  Looked up every time: ``optimizer.load_state_dict``
        replaces the group dicts with new ones, so controllers never keep references to groups."""
        loc = param_locations(self.optimizer)
        try:
            return [loc[id(p)][1] for p in params]
        except KeyError:
            raise ValueError("a controlled parameter is no longer in the optimizer") from None

    def _adopt(self, units: Sequence[Controlled], wd0: float | str | None, *, one_base: str | None = None) -> None:
        """Take ``units`` as the controlled matrices: sets ``units``, ``names``, ``wd0`` (:func:`resolve_wd0`)
        and records the groups' base decays.  ``one_base``: why every module needs the same base decay
        (``ValueError`` when they differ)."""
        names = [u.name for u in units]
        base = resolve_wd0(self.current_groups([u.weight for u in units]), wd0, names)
        if one_base is not None and len(set(base)) != 1:
            raise ValueError(
                f"{one_base}, but the analysed modules have several ({sorted(set(base))}); pass a number as wd0"
            )
        self.units, self.names, self.wd0 = list(units), names, base
        self._params = [u.weight for u in units]
        self.record_base([t for u in units for t in u.tensors])

    def record_base(self, params: Sequence[torch.Tensor]) -> None:
        """Record the base decay of the groups holding ``params`` (``initial_weight_decay``; kept if present)."""
        for g in self.current_groups(params):
            g.setdefault(INITIAL_WEIGHT_DECAY, float(g.get("weight_decay", 0.0)))

    def write_decays(self, units: Sequence[Controlled], decays: Sequence[float]) -> None:
        """``weight_decay`` of the group(s) of each unit's tensors (the only thing a controller writes)."""
        pairs = [(t, float(wd)) for u, wd in zip(units, decays) for t in u.tensors]
        for g, (_, wd) in zip(self.current_groups([t for t, _ in pairs]), pairs):  # one lookup for all units
            g["weight_decay"] = wd

    def write_untuned(self, units: Sequence[Controlled], wd: float) -> None:
        """``weight_decay = wd`` for every group holding no tensor of ``units`` (the authors' "untuned" group)."""
        mine = {id(t) for u in units for t in u.tensors}
        for g in self.optimizer.param_groups:
            if not any(id(p) in mine for p in g["params"]):
                g["weight_decay"] = float(wd)

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


class PerMatrixController(DecayController):
    """A controller that sets one decay per matrix, so it needs each matrix it controls in a parameter group of
    its own (:func:`check_layout`)."""

    @classmethod
    def per_matrix_for(cls, **options: Any) -> PerMatrix:
        """``"authors"`` for ``modules="authors"``, else the ``select`` option if given, else ``True`` (the block
        matrices): the ``per_matrix`` argument of :func:`layerwise.param_groups` this controller needs."""
        if options.get("modules", "blocks") == "authors":
            return "authors"
        select = options.get("select")
        return True if select is None else select
