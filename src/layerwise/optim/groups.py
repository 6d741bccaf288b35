"""Parameter groups from ordered name rules, with width scaling and a multiplier group.

:func:`param_groups` turns a model (or ``(name, parameter)`` pairs) into ``torch.optim`` parameter groups,
torchtitan-style: ordered regex rules over *canonical* names (first match wins), then the built-in
classification: the :mod:`layerwise.anatomy` role of each parameter mapped to a width class by
:func:`layerwise.scaling.width_class`.  A parameter the anatomy cannot classify (role ``other``) is an error
when a width rule is given (the message lists them and shows the ``rules=`` entry that assigns them); without
one it is treated by shape (< 2 dims: vector, else matrix) and listed in one warning.  Every trainable
parameter is assigned to exactly one group — checked: a parameter that no rule assigns or two different
tensors under one name raises ``ValueError`` naming it (a tensor reachable under two names is placed once,
under its first name).

Group dicts follow the layerwise contract: ``"params"``, ``"lr"``, ``"weight_decay"``, ``"param_names"``
(canonical names, same order as ``params``), ``"group"`` (a label: ``"embedding"``, ``"matrix"``,
``"readout"``, ``"vector"``, ``"multiplier"`` or a user rule's label), plus ``"param_class"`` (the width
class used for scaling), ``"lr_scale"`` (group lr / base lr) and ``"wd_scale"`` (the factor the width rule and
the matching user rule put on the base decay; 1.0 without either) and ``"wd_convention"``.  Optimizers must
tolerate extra keys; ``torch.optim`` does.

Weight decay is PyTorch's coupled convention by default: one step does ``θ ← θ·(1 − lr·λ)``.  With
``wd_convention="independent"`` every λ given (``weight_decay``, ``multiplier_weight_decay``, a rule's
``weight_decay``) is a per-step shrink at the peak LR, ``θ ← θ·(1 − s_t·λ)`` with ``s_t = lr_t / lr_peak``
the schedule's factor: the group's torch ``weight_decay`` is ``λ / lr`` of the group (0 where the group's lr
is 0), so the shrink does not depend on the peak LR.  A group's ``"weight_decay"`` is always torch's value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise.anatomy import ParamInfo
from layerwise.names import canonical_name
from layerwise.scaling.rules import PARAM_CLASSES, WD_CONVENTIONS, WidthScaling, width_class

if TYPE_CHECKING:
    from layerwise.decay._base import PerMatrix

__all__ = ["param_groups", "RuleSpec"]

#: A user rule's right-hand side: a class name, or a mapping with keys among
#: ``group`` (label), ``param_class`` (one of PARAM_CLASSES), ``lr_scale``, ``wd_scale``, ``weight_decay``.
RuleSpec = str | Mapping[str, Any]

_SPEC_KEYS = frozenset({"group", "param_class", "lr_scale", "wd_scale", "weight_decay"})


def _nonneg(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be a non-negative finite number, got {value!r}")
    return float(value)


def _named(model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Canonical (name, tensor) pairs of the trainable parameters, deduplicated by identity (first name wins)."""
    items: list[tuple[str, torch.Tensor]]
    if isinstance(model_or_named_params, nn.Module):
        items = list(model_or_named_params.named_parameters())
    else:
        try:
            items = list(model_or_named_params)
        except TypeError:
            raise TypeError(
                "param_groups expects an nn.Module or an iterable of (name, parameter) pairs, got "
                f"{type(model_or_named_params).__name__}"
            ) from None
    out: list[tuple[str, torch.Tensor]] = []
    seen_ids: set[int] = set()
    by_name: dict[str, torch.Tensor] = {}
    for item in items:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            raise TypeError(f"param_groups expects (name, tensor) pairs; got an item of type {type(item).__name__}")
        raw, p = item
        name = canonical_name(raw)
        if not p.requires_grad:
            continue  # frozen parameters are skipped
        if name in by_name and by_name[name] is not p:
            raise ValueError(f"two different tensors share the canonical name {name!r}; parameter names must be unique")
        if id(p) in seen_ids:
            continue  # tied / shared parameter: keep the first name
        seen_ids.add(id(p))
        by_name[name] = p
        out.append((name, p))
    return out


#: short no-decay tokens and the anatomy roles they stand for
_TOKEN_ROLES = {"embed": ("embedding", "position_embedding"), "head": ("readout",)}


def _token_match(info: ParamInfo, tokens: Sequence[str]) -> bool:
    """A no-decay token matches the anatomy role (``norm``, ``bias``, ``multiplier``, ``embedding``,
    ``ssm_vector`` ...; ``embed`` = embedding or position embedding, ``head`` = readout), the operator
    (``q``, ``down`` ...) or any dotted component of the canonical name."""
    parts = set(info.name.split("."))
    return any(
        t == info.role or info.role in _TOKEN_ROLES.get(t, ()) or t == info.operator or t in parts for t in tokens
    )


def _compile_rules(rules: Sequence[tuple[str, RuleSpec]] | None) -> list[tuple[re.Pattern[str], dict[str, Any]]]:
    if rules is None:
        return []
    if isinstance(rules, (str, bytes, Mapping)):
        raise TypeError("rules must be a sequence of (regex, spec) pairs")
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(f"rules[{i}] must be a (regex, spec) pair, got {rule!r}")
        pattern, spec = rule
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rules[{i}] has an invalid regex {pattern!r}: {e}") from None
        if isinstance(spec, str):
            spec = {"param_class": spec}
        if not isinstance(spec, Mapping):
            raise TypeError(f"rules[{i}] spec must be a class name or a mapping, got {type(spec).__name__}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ValueError(
                f"rules[{i}] ({pattern!r}) has unknown key(s) {sorted(unknown)}; valid: {sorted(_SPEC_KEYS)}"
            )
        spec = dict(spec)
        if "param_class" in spec and spec["param_class"] not in PARAM_CLASSES:
            raise ValueError(
                f"rules[{i}] ({pattern!r}) param_class {spec['param_class']!r} is not one of {PARAM_CLASSES}"
            )
        if "group" in spec and not (isinstance(spec["group"], str) and spec["group"]):
            raise ValueError(f"rules[{i}] ({pattern!r}) group label must be a non-empty str, got {spec['group']!r}")
        for key in ("lr_scale", "wd_scale", "weight_decay"):
            if key in spec:
                spec[key] = _nonneg(f"rules[{i}] ({pattern!r}) {key}", spec[key])
        compiled.append((regex, spec))
    return compiled


def _per_matrix_units(model: Any, per_matrix: PerMatrix) -> dict[int, tuple[str, bool]]:
    """``id(tensor) -> (name of its controlled matrix, whether it is that matrix)`` for ``per_matrix``."""
    if per_matrix is False or per_matrix is None:
        return {}
    if not isinstance(model, nn.Module):
        raise TypeError("param_groups(per_matrix=...) needs the model (its modules), not (name, tensor) pairs")
    from layerwise.decay._base import controlled_units

    units = controlled_units(model, per_matrix, controller="param_groups(per_matrix=...)")
    return {id(t): (u.name, t is u.weight) for u in units for t in u.tensors}


def param_groups(
    model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
    lr: float,
    weight_decay: float,
    scaling: WidthScaling | None = None,
    *,
    multiplier_weight_decay: float = 2e-3,
    multiplier_lr_scale: float = 1.0,
    no_decay: Sequence[str] = ("norm", "bias", "multiplier"),
    rules: Sequence[tuple[str, RuleSpec]] | None = None,
    default_rules: bool = True,
    per_matrix: PerMatrix = False,
    wd_convention: str | None = None,
) -> list[dict[str, Any]]:
    """Build ``torch.optim`` parameter groups: one group per class (or user label) and hyper-parameters.

    Args:
        model_or_named_params: a module (its ``named_parameters()``) or ``(name, tensor)`` pairs.  Names are
            canonicalised; frozen tensors (``requires_grad=False``) are skipped; a tensor reachable under two
            names (tied weights) is placed once, under its first name.
        lr: base learning rate.
        weight_decay: base weight decay λ, in ``wd_convention`` (default PyTorch's coupled ``θ ← θ·(1 − lr·λ)``).
        scaling: a :class:`~layerwise.scaling.WidthScaling`; multiplies each tensor's (lr, λ) by its factors:
            per class at one global ``m`` (``WidthScaling(base_width, width)``: the model's hidden size must
            equal ``scaling.width`` when readable), or per tensor (``WidthScaling.from_models``: classes and
            fan-in multipliers from the shapes; the parameters' shapes must be the ones the rule was built
            from).  ``ValueError`` otherwise.  ``None`` (or a rule at the base width) gives the unscaled groups.
        multiplier_weight_decay: λ of learnable multipliers (the LRM paper's 2e-3), never width-scaled.
        multiplier_lr_scale: multipliers' LR is ``lr × multiplier_lr_scale``.
        no_decay: tokens naming parameters that do *not* take the main ``weight_decay``; a token matches the
            anatomy role (``norm``, ``bias``, ``multiplier``, ``embedding``, ``readout``, ...; ``embed`` and
            ``head`` are short for embeddings and the readout), the operator (``q``, ``down`` ...) or any
            dotted component of the canonical name.  A matching multiplier gets ``multiplier_weight_decay`` instead,
            every other matching parameter λ = 0.  (Drop ``"multiplier"`` to give multipliers the main λ;
            add ``"embed"`` for Fan et al.'s undecayed embeddings.)  Vector-like parameters (norms, biases,
            any tensor with < 2 dimensions) are never decayed, whatever the tokens.
        rules: ordered ``(regex, spec)`` pairs tried before the built-in classes; ``re.search`` on the
            canonical name, first match wins.  ``spec`` is a class name (``"vector"`` ...) or a mapping with
            keys ``group`` (label; default: the class), ``param_class`` (width class; default: built-in
            classification from the anatomy role), ``lr_scale`` (extra LR factor), ``wd_scale`` (extra λ factor) and
            ``weight_decay`` (this rule's base λ, replacing ``weight_decay`` / the no-decay choice; still
            width-scaled by the class factor).
        default_rules: if False, a parameter that matches no user rule is an error (``ValueError`` naming it).
        wd_convention: ``"coupled"`` (PyTorch's ``θ ← θ·(1 − lr·λ)``) or ``"independent"`` (``θ ← θ·(1 − s_t·λ)``,
            ``s_t = lr_t / lr_peak``; torch's group ``weight_decay`` = λ / group lr); ``None`` = the rule's
            ``wd_convention``, else ``"coupled"``.  A width rule's factors keep the same per-step shrink in both
            conventions (:meth:`~layerwise.scaling.WidthScaling.shrink_mult`).
        per_matrix: one group for each matrix a weight-decay controller sets a decay for (the layout
            :class:`layerwise.AlphaDecay`, ``TypeDecay`` and ``AdaDecay`` need; controllers never regroup an
            optimizer): ``True`` (or ``"blocks"``) = every block matrix of :func:`layerwise.anatomy` (the
            controllers' default); ``"authors"`` = the AlphaDecay authors' module set (every ``nn.Linear`` but
            the first and the last), each matrix with its module's bias, which takes the matrix's
            ``weight_decay`` (in the matrix's group, or in a group of its own where a width rule gives it another
            ``lr``); a regex, a callable ``(name, tensor) -> bool`` or a list of names = the matrices
            a controller's ``select=`` picks; ``False`` (default): none.  Needs a model (not name pairs).
            :func:`layerwise.decay.per_matrix_for` gives the value a controller built with given options needs.
            A per-matrix group keeps the label, class and hyper-parameters its matrix would have had.

    Raises:
        ValueError: with ``scaling``, parameters the anatomy cannot classify (role ``other``) and no rule
            assigns a ``param_class`` - the message lists them and shows the ``rules=`` entry to add.

    Returns:
        A list of group dicts (see the module docstring), ordered by the first parameter of each group.
        Parameters of one label with identical (lr, weight_decay, class) share a group.
    """
    lr = _nonneg("lr", lr)
    weight_decay = _nonneg("weight_decay", weight_decay)
    multiplier_weight_decay = _nonneg("multiplier_weight_decay", multiplier_weight_decay)
    multiplier_lr_scale = _nonneg("multiplier_lr_scale", multiplier_lr_scale)
    if isinstance(no_decay, str):
        raise TypeError("no_decay must be a sequence of tokens such as ('norm', 'bias', 'multiplier'), not a str")
    no_decay = tuple(no_decay)
    if scaling is not None and not isinstance(scaling, WidthScaling):
        raise TypeError(f"scaling must be a WidthScaling or None, got {type(scaling).__name__}")
    convention = wd_convention or (scaling.wd_convention if scaling is not None else "coupled")
    if convention not in WD_CONVENTIONS:
        raise ValueError(f"wd_convention must be one of {WD_CONVENTIONS}, got {wd_convention!r}")
    if scaling is not None and convention != scaling.wd_convention:
        raise ValueError(
            f"wd_convention={convention!r} differs from the width rule's {scaling.wd_convention!r}; build the rule "
            f"with WidthScaling(..., wd_convention={convention!r})"
        )
    compiled = _compile_rules(rules)

    named = _named(model_or_named_params)
    unit_of = _per_matrix_units(model_or_named_params, per_matrix)
    an = _anatomy.anatomy(model_or_named_params if isinstance(model_or_named_params, nn.Module) else dict(named))
    if scaling is not None:
        scaling.check_model(model_or_named_params if isinstance(model_or_named_params, nn.Module) else named, an)
    plan: list[tuple[str, torch.Tensor, ParamInfo, dict[str, Any], str | None]] = []
    unclassified: list[ParamInfo] = []
    for name, p in named:
        spec: dict[str, Any] | None = None
        for regex, s in compiled:
            if regex.search(name):
                spec = s
                break
        if spec is None:
            if not default_rules:
                raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) is not assigned by any rule")
            spec = {}
        info = an.by_name(name)
        cls = spec.get("param_class") or (scaling.param_class(info) if scaling is not None else width_class(info))
        if cls is None:
            unclassified.append(info)
        plan.append((name, p, info, spec, cls))
    if unclassified:
        listed = ", ".join(f"{r.name} {list(r.shape)}" for r in unclassified[:10]) + (
            " ..." if len(unclassified) > 10 else ""
        )
        example = re.escape(unclassified[0].name)
        if scaling is not None:
            raise ValueError(
                f"param_groups: {len(unclassified)} parameter(s) have no width class (layerwise.anatomy role "
                f"'other'): {listed}.  Assign each a class with a rule, e.g. "
                f'param_groups(..., rules=[(r"^{example}$", "vector")]) (classes: {PARAM_CLASSES})'
            )
        _anatomy.warn_once(
            f"param_groups:{listed}",
            f"param_groups: {len(unclassified)} parameter(s) cannot be classified by "
            f"layerwise.anatomy and are treated by shape (< 2 dims: vector, no decay; else matrix): "
            f"{listed}; pass rules=[(regex, class)] to choose",
        )
    groups: dict[tuple, dict[str, Any]] = {}
    matrix_keys: dict[str, dict[str, Any]] = {}  # controlled matrix -> the keys its group(s) take
    for name, p, info, spec, cls in plan:
        if cls is None:
            cls = "vector" if p.ndim < 2 else "matrix"
        label = spec.get("group", cls)

        # base (lr, λ) of the parameter before width scaling
        p_lr = lr * (multiplier_lr_scale if cls == "multiplier" else 1.0)
        if "weight_decay" in spec:
            p_wd = spec["weight_decay"]
        elif cls == "vector":
            p_wd = 0.0
        elif _token_match(info, no_decay):
            p_wd = multiplier_weight_decay if cls == "multiplier" else 0.0
        else:
            p_wd = weight_decay
        lr_factor = (scaling.lr_mult(cls, name) if scaling is not None else 1.0) * spec.get("lr_scale", 1.0)
        wd_factor = (scaling.wd_mult(cls, name) if scaling is not None else 1.0) * spec.get("wd_scale", 1.0)
        g_lr = p_lr * lr_factor
        g_wd = p_wd * wd_factor
        if convention == "independent":  # shrink s_t·λ per step: torch's coupled lr_t·wd with wd = λ / lr
            g_wd = g_wd / g_lr if g_lr > 0 else 0.0
        lr_scale = g_lr / lr if lr > 0 else (multiplier_lr_scale if cls == "multiplier" else 1.0) * lr_factor

        key: tuple = (label, cls, g_lr, g_wd)
        unit = unit_of.get(id(p))
        if unit is not None:  # a controlled matrix, alone or with its module's bias (one group per lr)
            key = ("per_matrix", unit[0], g_lr)
            if unit[1]:
                matrix_keys[unit[0]] = dict(group=label, param_class=cls, weight_decay=g_wd, wd_scale=wd_factor)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {
                "params": [],
                "param_names": [],
                "group": label,
                "param_class": cls,
                "lr": g_lr,
                "weight_decay": g_wd,
                "lr_scale": lr_scale,
                "wd_scale": wd_factor,
                "wd_convention": convention,
            }
        g["params"].append(p)
        g["param_names"].append(name)

    for key, g in groups.items():  # a matrix's bias takes its label, class and decay (in its group or its own)
        if key[0] == "per_matrix":
            g.update(matrix_keys[key[1]])
    out = list(groups.values())
    total = sum(len(g["params"]) for g in out)
    if total != len(named) or len({id(p) for g in out for p in g["params"]}) != total:
        raise ValueError("internal error: parameter groups do not cover every trainable parameter exactly once")
    return out
