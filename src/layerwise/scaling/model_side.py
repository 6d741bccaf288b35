"""The model-side half of μP for any model: init rescaling, the readout multiplier, the attention scale.

:func:`apply_` (``rule.apply_(model)``) makes a model built at the target width a μP model, in place, for a
:class:`~layerwise.scaling.WidthScaling` rule (per tensor from :meth:`~layerwise.scaling.WidthScaling.from_models`,
or the global rule).  It composes with whatever init the model did (it multiplies the existing tensors), never
renames a parameter, and refuses to run twice on one model.

1. **Init** (``init=``, what the model's own init is): ``"constant"`` (default; an init std that does not depend
   on width, like Hugging Face's ``initializer_range`` or the lab's ``init_std``): matrix-like weights ×
   ``m_in^(−1/2)`` (variance ∝ 1/fan_in), output-like weights × ``1/m_in`` under ``readout="lr"`` (× 1 under
   ``"multiplier"``); ``"fan_in"`` (std ∝ 1/sqrt(fan_in), PyTorch's default ``nn.Linear`` init, already μP for
   matrices): output-like × ``m_in^(1/2)`` under ``"multiplier"`` (mup's ``MuReadout`` rescale), ×
   ``m_in^(−1/2)`` under ``"lr"``, and the biases of layers whose fan-in grows × ``m_in^(1/2)`` (mup's
   ``rescale_linear_bias``); ``"keep"``: weights untouched (a model about to load trained weights).
   Input-like (embeddings, a first layer), vector-like and unscaled tensors are never changed.  A tied
   embedding / LM head is one input-like tensor: it is not rescaled (and not twice).
2. **Readout multiplier** (``readout="multiplier"``): the head's *input* is multiplied by ``1/m_in`` (a
   forward pre-hook on the module that owns each output-like weight: the LM head, a classifier, an MoE
   router; the bias is not scaled, as in mup's ``MuReadout``).  A tied LM head gets the hook on the head
   module only, so the embedding's output is untouched.  A model whose config has its own logit multiplier
   (Falcon-H1's ``lm_head_multiplier``) gets it multiplied there instead (module attribute and config), so
   ``save_pretrained`` carries it.
3. **Attention scale**: μP's ``1/head_dim`` logit scale with the base-matched constant,
   ``scale = sqrt(base_head_dim) / head_dim``: at the base head size it is the standard ``1/sqrt(head_dim)``,
   so m = 1 is the identity, and it falls as ``1/head_dim`` as heads widen.  Applied as a factor
   ``sqrt(base_head_dim / head_dim)`` on the attention module's own ``scaling`` attribute (Hugging Face
   attention modules; any width-independent factor in it, such as GPT-2's ``1/(layer+1)``, is kept), or on
   Falcon-H1's ``key_multiplier`` (module and config).  Nothing changes when the head size does not grow
   (wider models with more heads).  Head sizes come from the rule (:meth:`~layerwise.scaling.WidthScaling.
   from_models` reads them from both models); the global rule does not know the base head size.

Whatever cannot be done (a model that exposes no attention scale while its head size grows, unreadable head
sizes, unclassified tensors left as they are) is said in **one** warning naming it.

Checkpoints: hooks and ``scaling`` attributes are not in a state dict.  To *continue training* from a
checkpoint, build the model, ``rule.apply_(model, init="keep")``, then load the weights.  To *export* (a plain
model that computes the same function), :func:`fold_` (``rule.fold_(model)``) multiplies the readout factor
into the head weight and the attention factor into the query projection, and removes the hooks; it refuses a
tied LM head (the factor would also scale the embedding) and a fused or normalised query projection, naming
them.  Config-held multipliers (Falcon-H1) need no folding.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise.scaling.rules import INIT_MODES, _tied_readouts

if TYPE_CHECKING:  # pragma: no cover
    from layerwise.scaling.rules import WidthScaling

__all__ = ["apply_", "fold_", "applied"]

_MARK = "_layerwise_width_scaling"


@dataclass
class _Applied:
    """What :func:`apply_` did to a model (kept on the model, read by :func:`fold_`)."""

    rule: Any
    hooks: dict[str, tuple[Any, float]]  # readout module -> (hook handle, factor)
    scaling: dict[str, float]  # attention module -> factor put on its ``scaling``
    config: dict[str, float]  # config attribute -> factor put on it (Falcon-H1)
    folded: bool = False


class _InputScale:
    """Forward pre-hook: multiply a module's first positional input by ``factor`` (μP's readout multiplier)."""

    def __init__(self, factor: float, name: str) -> None:
        self.factor = factor
        self.name = name

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args or not isinstance(args[0], torch.Tensor):
            raise RuntimeError(
                f"layerwise readout multiplier on {self.name!r}: the module was called without its input as the "
                "first positional argument; build the rule with readout='lr' for this model"
            )
        return (args[0] * self.factor, *args[1:])


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under ``torch.compile`` (``_orig_mod``) and DDP / DataParallel (``module``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def applied(model: nn.Module) -> _Applied | None:
    """What :func:`apply_` did to ``model`` (``None`` if it was not called)."""
    state = getattr(_unwrap(model), _MARK, None)
    return state if isinstance(state, _Applied) else None


def _config_number(obj: Any, attr: str) -> bool:
    v = getattr(obj, attr, None)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scale_attr(root: nn.Module, attr: str, factor: float, modules: list[nn.Module]) -> None:
    for mod in modules:
        setattr(mod, attr, getattr(mod, attr) * factor)
    cfg = getattr(root, "config", None)
    if cfg is not None and _config_number(cfg, attr):
        setattr(cfg, attr, getattr(cfg, attr) * factor)


def _scaling_holder(attention: nn.Module) -> nn.Module | None:
    """The module that holds the attention-logit scale ``scaling`` (a float): the attention module itself or
    one of its sub-modules (BERT's ``attention.self``)."""
    return next((m for m in attention.modules() if isinstance(getattr(m, "scaling", None), float)), None)


def _readout_targets(rule: WidthScaling, an: _anatomy.Anatomy, classes: dict[str, str | None]) -> dict[str, float]:
    """``{module: factor}`` of the readout multiplier: every output-like weight's owner (1/m_in) and every
    module that uses a tied input-like tensor as its weight (1/the tensor's width multiplier)."""
    out: dict[str, float] = {}
    for row in an:
        if classes.get(row.name) == "readout":
            m_in = rule.multipliers("readout", row.name)[0]
            if m_in != 1.0:
                if row.layout not in ("out_in", "in_out", "conv"):
                    raise ValueError(
                        f"WidthScaling.apply_: the output-like weight {row.name!r} is not held by a linear or "
                        f"convolution module ({row.module_class}), so its 1/m readout multiplier cannot be "
                        "attached; build the rule with readout='lr' for this model"
                    )
                out[row.module] = 1.0 / m_in
    for mod_name in _tied_readouts(an, classes):
        w = getattr(an.module(mod_name), "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        row = an.of(w)
        m = rule.multipliers("embedding", row.name)[1]
        if m != 1.0:
            out[mod_name] = 1.0 / m
    return out


def _bias_owner_m_in(rule: WidthScaling, an: _anatomy.Anatomy, row: _anatomy.ParamInfo) -> float:
    weight = an.get(f"{row.module}.weight" if row.module else "weight")
    if weight is None or weight.role in ("bias", "norm", "other"):
        return 1.0
    cls = rule.param_class(weight)
    if cls not in ("matrix", "readout"):  # the fan-in of the other classes does not grow
        return 1.0
    return rule.multipliers(cls, weight.name)[0]


def apply_(rule: WidthScaling, model: nn.Module, *, init: str = "constant") -> dict[str, Any]:
    """μP on ``model`` itself, in place (see the module docstring).  Returns what was done:
    ``{"init": {name: factor}, "readout": {module: factor}, "attention": {module: factor},
    "config": {attribute: factor}, "not_done": [str]}`` (factors of exactly 1 are left out).

    Raises ``RuntimeError`` when called a second time on the same model (it would scale twice) and
    ``ValueError`` when the model does not fit the rule (shapes, hidden size) or a readout multiplier cannot be
    attached (naming the tensor).
    """
    if init not in INIT_MODES:
        raise ValueError(f"WidthScaling.apply_: init must be one of {INIT_MODES}, got {init!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"WidthScaling.apply_ expects an nn.Module, got {type(model).__name__}")
    root = _unwrap(model)
    if applied(root) is not None:
        raise RuntimeError(
            "WidthScaling.apply_ was already called on this model; a second call would scale the init, the "
            "readout multiplier and the attention scale twice.  Build a fresh model to apply another rule"
        )
    an = _anatomy.anatomy(root)
    rule.check_model(root, an)
    classes = {row.name: rule.param_class(row) for row in an}
    not_done: list[str] = []
    unclassified = [row.name for row in an if classes[row.name] is None]
    if unclassified:
        not_done.append(f"unclassified tensors left as they are: {', '.join(unclassified[:8])}")

    # plan everything first (errors leave the model untouched), then change it
    init_factors: dict[str, float] = {}
    for row in an:
        cls = classes[row.name]
        if cls is None:
            continue
        f = rule.init_mult(cls, row.name, init=init)
        if init == "fan_in" and row.role == "bias":
            m_in = _bias_owner_m_in(rule, an, row)
            f = 1.0 if m_in == 1.0 else math.sqrt(m_in)
        if f != 1.0:
            init_factors[row.name] = f
    readout = _readout_targets(rule, an, classes) if rule.readout == "multiplier" else {}
    config: dict[str, float] = {}
    cfg = getattr(root, "config", None)
    get_out = getattr(root, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for mod_name, f in list(readout.items()):
        if out_emb is not None and an.module(mod_name) is out_emb and _config_number(cfg, "lm_head_multiplier"):
            holders = [m for m in root.modules() if _config_number(m, "lm_head_multiplier")]
            if holders:
                config["lm_head_multiplier"] = f
                del readout[mod_name]
    scaling: dict[str, float] = {}
    if rule.attention is None:
        if rule.width != rule.base_width and any(b.attention is not None for b in an.blocks()):
            not_done.append(
                "attention scale: WidthScaling(base_width, width) does not know the base model's head size "
                "(build the rule with WidthScaling.from_models to set μP's 1/head_dim scale)"
            )
    else:
        key_factors = set()
        for rec in rule.attention:
            f_att = rec.factor
            if f_att is None:
                not_done.append(f"attention scale of {rec.module}: head size not readable in the model or the base")
                continue
            if f_att == 1.0:
                continue
            mod = an.module(rec.module)
            if _config_number(mod, "key_multiplier") and _config_number(cfg, "key_multiplier"):
                key_factors.add(f_att)
            elif _scaling_holder(mod) is not None:
                scaling[rec.module] = f_att
            else:
                not_done.append(f"attention scale of {rec.module} ({type(mod).__name__} has no 'scaling' attribute)")
        if len(key_factors) > 1:
            raise ValueError(
                "WidthScaling.apply_: the attention modules' head sizes change by different factors "
                f"{sorted(key_factors)} but the model's config holds one key_multiplier"
            )
        if key_factors:
            config["key_multiplier"] = key_factors.pop()

    with torch.no_grad():
        for row in an:
            if row.name in init_factors and row.tensor is not None:
                row.tensor.mul_(init_factors[row.name])
    hooks = {name: (an.module(name).register_forward_pre_hook(_InputScale(f, name)), f) for name, f in readout.items()}
    for name, f in scaling.items():
        holder = _scaling_holder(an.module(name))
        assert holder is not None  # checked above
        setattr(holder, "scaling", float(getattr(holder, "scaling")) * f)  # noqa: B009, B010 - not a Module field
    for attr, f in config.items():
        _scale_attr(root, attr, f, [m for m in root.modules() if _config_number(m, attr)])
    object.__setattr__(root, _MARK, _Applied(rule=rule, hooks=hooks, scaling=scaling, config=config))
    if not_done:
        warnings.warn("WidthScaling.apply_ did not do everything: " + "; ".join(not_done), UserWarning, stacklevel=3)
    return {
        "init": init_factors,
        "readout": dict(readout),
        "attention": dict(scaling),
        "config": dict(config),
        "not_done": not_done,
    }


def _query_rows(an: _anatomy.Anatomy, attention: str) -> list[_anatomy.ParamInfo]:
    """The query projection's weight and bias rows inside an attention module; ``ValueError`` when there is no
    separate query projection or a norm sits inside the attention module (it would undo a scale on q)."""
    inside = [r for r in an if r.module.startswith(attention + ".")]
    norms = [r.name for r in inside if r.role == "norm"]
    q = [r for r in inside if r.role == "block_matrix" and r.operator == "q"]
    if norms or len(q) != 1:
        why = f"it normalises q/k ({norms[0]})" if norms else "it has no separate query projection (fused qkv?)"
        raise ValueError(
            f"WidthScaling.fold_: cannot fold the attention scale of {attention!r} into its weights: {why}; keep "
            "the model's 'scaling' attribute (not a plain checkpoint), or widen with more heads of the base head size"
        )
    bias = an.get(f"{q[0].module}.bias")
    return [q[0]] + ([bias] if bias is not None else [])


def fold_(rule: WidthScaling, model: nn.Module) -> dict[str, Any]:
    """Fold what :func:`apply_` attached into plain weights (see the module docstring); returns
    ``{"readout": {module: factor}, "attention": {module: factor}, "config": {attribute: factor}}``.

    After this the model computes the same function with no hooks and its original attention ``scaling``, so
    ``save_pretrained`` / a state dict is a plain checkpoint.  Calling it again is a no-op.  Raises
    ``ValueError`` (and changes nothing) for a tied LM head or a query projection that cannot carry the scale.
    """
    root = _unwrap(model)
    state = applied(root)
    if state is None:
        raise ValueError("WidthScaling.fold_: apply_ was not called on this model; there is nothing to fold")
    if state.rule != rule:
        raise ValueError("WidthScaling.fold_: the model was set up by apply_ of a different rule")
    if state.folded:
        return {"readout": {}, "attention": {}, "config": dict(state.config)}
    an = _anatomy.anatomy(root)
    heads = {}
    for name in state.hooks:
        w = getattr(an.module(name), "weight", None)
        row = an.of(w) if isinstance(w, torch.Tensor) else None
        if row is None or len(row.names) > 1:
            raise ValueError(
                f"WidthScaling.fold_: the readout {name!r} shares its weight with "
                f"{row.names[0] if row else 'another module'} (tied embeddings): folding its 1/m multiplier would "
                "also scale the embedding.  Keep the hook (set the multiplier again after loading) or train untied"
            )
        heads[name] = row
    queries = {name: _query_rows(an, name) for name in state.scaling}
    with torch.no_grad():
        for name, (handle, f) in state.hooks.items():
            heads[name].tensor.mul_(f)  # type: ignore[union-attr]
            handle.remove()
        for name, f in state.scaling.items():
            for row in queries[name]:
                row.tensor.mul_(f)  # type: ignore[union-attr]
            holder = _scaling_holder(an.module(name))
            assert holder is not None  # apply_ scaled it
            setattr(holder, "scaling", float(getattr(holder, "scaling")) / f)  # noqa: B009, B010 - not a Module field
    state.folded = True
    return {
        "readout": {n: f for n, (_, f) in state.hooks.items()},
        "attention": dict(state.scaling),
        "config": dict(state.config),
    }
