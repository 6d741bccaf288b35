"""Width scaling rules: μP with a weight-decay exponent (Fan et al., arXiv 2510.15262), per class or per tensor.

Two ways to build a rule
------------------------
* ``WidthScaling(base_width, width)``: one global multiplier ``m = width / base_width`` for every tensor;
  classes from the :mod:`layerwise.anatomy` role (table below).  Right when every hidden dimension (the
  FFN size, the attention width) grows in proportion to the hidden size.
* ``WidthScaling.from_models(model, base=base_model, delta=None)``: per tensor, from the shapes of the
  user's own model against a base model built at the proxy width (ideally on the ``meta`` device; only
  shapes are read).  Every tensor gets its fan-in and fan-out multipliers ``(m_in, m_out)`` and a class
  decided by which of them grow (:mod:`layerwise.scaling.shapes`; mup's ``set_base_shapes`` rule), keyed by
  canonical name so it survives DDP (``module.``), ``torch.compile`` (``_orig_mod.``) and FSDP2.

Both are the same machinery: the global rule is the per-tensor rule with ``m_in = m_out = m`` for every
tensor and the class of the anatomy role.

Parameter classes
-----------------
==============  ==========================================  ==============================================
class           from the anatomy role (global rule)          from shapes (``from_models``)
==============  ==========================================  ==============================================
``matrix``      ``block_matrix``, ``matrix``, a full conv   fan-in and fan-out grow (q/k/v/o, gate/up/down)
``embedding``   ``embedding``, ``position_embedding``,      input-like: fan-out grows, fan-in fixed
                ``input``                                    (embeddings, a first layer)
``readout``     ``readout``                                  output-like: fan-in grows, fan-out fixed
                                                             (LM head, classifier, router)
``vector``      ``norm``, ``bias``, ``ssm_vector``,          the same roles, whatever their shape
                depthwise ``conv``
``multiplier``  ``multiplier``                               the same role
``unscaled``    (not used)                                   a non-vector tensor with no width dimension
==============  ==========================================  ==============================================

A tied embedding / LM head is one tensor with role ``embedding`` (input-like).  Role ``other`` (unclassified)
has no class: :func:`width_class` returns ``None`` and :func:`layerwise.param_groups` with a width rule
raises, listing the tensors and how to pass a rule for them.

The rule, per tensor (``m_in`` / ``m_out``: that tensor's fan-in / fan-out multiplier)
------------------------------------------------------------------------------------
Weight decay, by default, is PyTorch's **coupled** convention: one AdamW step does ``θ ← θ·(1 − lr·λ)``
(plus the Adam update).  :class:`WidthScaling` multiplies the base hyper-parameters ``(lr, λ)``:

* ``matrix``: ``lr × m_in^(−lr_exponent)``, ``λ × m_in^(wd_exponent)``; init std ``× m_in^(−1/2)``.  The
  multiplier is the tensor's **own fan-in multiplier** (``down_proj`` uses the FFN ratio, not the hidden
  ratio): Adam's update of ``W`` changes ``W·x`` by ``Θ(lr · fan_in)``, so the fan-in sets the LR; the decay
  uses the same ``m_in`` so that the per-step shrink ``lr·λ ∝ m_in^(wd_exponent − lr_exponent)`` depends on
  one multiplier, and ``wd_exponent=1`` is exactly mup's ``MuAdamW`` (whose width multiplier of a matrix
  is its fan-in dimension's):

  - ``wd_exponent=0.5`` (default, Fan et al.'s λ ∝ √d): ``lr·λ ∝ m^(−1/2)``;
  - ``wd_exponent=1.0``: ``lr·λ`` constant — mup's ``MuAdamW`` (LR ÷ m, λ × m);
  - ``wd_exponent=0.0``: plain μP, λ unchanged, ``lr·λ ∝ 1/m``.

* ``vector`` and ``multiplier``: LR unchanged, weight decay not width-scaled.  :func:`layerwise.param_groups`
  gives vectors λ = 0 and multipliers their own ``multiplier_weight_decay`` (width independent).
* ``embedding`` (input-like): LR × ``m_out^(−embedding_lr_exponent)`` (default exponent 0: LR unchanged),
  λ × ``m_out^(embedding_wd_exponent)`` (default 0: the base λ).  *Documented choice*: an embedding row has
  Θ(1) coordinates and Θ(1) Adam updates at every width, so a width-independent (lr, λ) keeps its AdamW
  equilibrium width-independent; Fan et al. count embeddings as vector-like and do not decay them at all —
  get that with ``param_groups(..., no_decay=("norm", "bias", "multiplier", "embed"))``.  Init unchanged.
* ``readout`` (output-like) with ``readout="multiplier"`` (default; mup's ``MuReadout``): the model
  multiplies the head's input by ``1/m_in`` (:meth:`WidthScaling.apply_` attaches it; the reference model
  ``layerwise.lab.model`` has it built in under ``parametrization="mup"``); the head's LR, λ and init std are
  then **unchanged** (the effective weight ``W/m`` has variance ∝ 1/m², μP's 1/fan_in² for the output
  layer).  With ``readout="lr"`` the model has no multiplier: LR × ``m_in^(−lr_exponent)``, λ unchanged, init
  std ``/ m_in`` (see :func:`init_std`).
* ``unscaled``: every factor exactly 1.
* Attention: μP's ``1/head_dim`` logit scale instead of ``1/sqrt(head_dim)`` when the head size grows;
  :meth:`WidthScaling.apply_` sets it on models that expose it (Hugging Face attention modules' ``scaling``).

Weight-decay conventions (``wd_convention``)
--------------------------------------------
* ``"coupled"`` (default, PyTorch's): the base λ is torch's ``weight_decay``; one step shrinks by
  ``lr_t·λ``.  The factors above are on this λ.
* ``"independent"`` (Wortsman et al. 2023; u-μP): the base λ is a per-step shrink at the peak LR; one step
  shrinks by ``s_t·λ`` with ``s_t = lr_t / lr_peak`` the schedule's factor, whatever the peak LR.
  :func:`layerwise.param_groups` writes torch's ``weight_decay = λ_group / lr_group``.  The rule keeps the
  *same physics* as under ``"coupled"`` — the per-step shrink of every class changes with width by
  :meth:`WidthScaling.shrink_mult` (``m_in^(wd_exponent − lr_exponent)`` for matrices) — so the independent λ
  of a class is multiplied by ``shrink_mult``: ``wd_exponent=0.5`` reads "shrink ∝ m^(−1/2)".  Coupled with
  ``(lr, λ_c)`` and independent with ``(lr, λ_i = lr·λ_c)`` give identical optimizers at every width.

``base_width == width`` (and a tensor with no width dimension) is the identity: every factor is exactly 1.0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from layerwise.anatomy import ParamInfo
from layerwise.names import canonical_name
from layerwise.scaling.shapes import AttentionScaling, TensorScaling

#: The parameter classes, in a fixed order (also the order of the groups built by ``param_groups``).
PARAM_CLASSES: tuple[str, ...] = ("embedding", "matrix", "readout", "vector", "multiplier", "unscaled")

#: The weight-decay conventions (see the module docstring).
WD_CONVENTIONS: tuple[str, ...] = ("coupled", "independent")

#: What :meth:`WidthScaling.apply_` assumes about the model's own init (see there).
INIT_MODES: tuple[str, ...] = ("constant", "fan_in", "keep")

#: Names of the width parametrisations the sweep offers, with the WidthScaling they map to (None = no rule).
PARAMETRIZATIONS: dict[str, dict[str, float] | None] = {
    "sp": None,
    "mup": {"wd_exponent": 0.0},
    "mup-sqrtwd": {"wd_exponent": 0.5},
    "mup-lrwd": {"wd_exponent": 1.0},
}


_ROLE_CLASS = {
    "embedding": "embedding",
    "position_embedding": "embedding",
    "input": "embedding",
    "block_matrix": "matrix",
    "matrix": "matrix",
    "readout": "readout",
    "norm": "vector",
    "bias": "vector",
    "ssm_vector": "vector",
    "multiplier": "multiplier",
}


def width_class(info: ParamInfo) -> str | None:
    """The width class (one of :data:`PARAM_CLASSES`) of an anatomy row, ``None`` when unclassified.

    See the module docstring for the table; a ``conv`` is ``vector`` when depthwise (Mamba's ``conv1d``),
    else ``matrix``.  (Classes from shapes: :meth:`WidthScaling.from_models`.)
    """
    if not isinstance(info, ParamInfo):
        raise TypeError(f"width_class expects a layerwise.anatomy.ParamInfo, got {type(info).__name__}")
    if info.role == "conv":
        return "vector" if info.depthwise else "matrix"
    return _ROLE_CLASS.get(info.role)


def _check_class(param_class: str) -> None:
    if param_class not in PARAM_CLASSES:
        raise ValueError(f"unknown parameter class {param_class!r}; choose one of {PARAM_CLASSES}")


def _power(m: float, exponent: float) -> float:
    """``m ** exponent``, exactly 1.0 at m = 1 or exponent 0 (so the base width is the identity)."""
    if m == 1.0 or exponent == 0.0:
        return 1.0
    return float(m**exponent)


def _init_exponent(param_class: str, readout: str) -> float:
    """μP's init std ∝ m_in^(−e): 1/2 for matrices, 1 for an output layer without a multiplier."""
    if param_class == "matrix":
        return 0.5
    if param_class == "readout" and readout == "lr":
        return 1.0
    return 0.0


def init_std(param_class: str, base_std: float, m: float, *, readout: str = "multiplier") -> float:
    """μP initial standard deviation at fan-in multiplier ``m`` for a class whose base-width std is ``base_std``.

    Init variance ∝ 1/fan_in for matrix-like parameters: ``matrix -> base_std / sqrt(m)``.  Embedding,
    vector, multiplier and unscaled: ``base_std`` (fan_in does not grow).  Readout: ``base_std`` with
    ``readout="multiplier"`` (the model's 1/m multiplier makes the effective variance ∝ 1/m²),
    ``base_std / m`` with ``readout="lr"`` (no multiplier: variance ∝ 1/fan_in², μP's output-layer init).
    """
    _check_class(param_class)
    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        raise ValueError(f"width multiplier m must be a positive finite number, got {m!r}")
    if not (isinstance(base_std, (int, float)) and base_std >= 0):
        raise ValueError(f"base_std must be a non-negative number, got {base_std!r}")
    if readout not in ("multiplier", "lr"):
        raise ValueError(f"readout must be 'multiplier' or 'lr', got {readout!r}")
    return float(base_std) * _power(float(m), -_init_exponent(param_class, readout))


def _positive_width(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"WidthScaling.{field} must be a positive integer, got {value!r}")
    if value <= 0 or int(value) != value:
        raise ValueError(f"WidthScaling.{field} must be a positive integer, got {value!r}")
    return int(value)


def _model_width(model: nn.Module) -> int | None:
    """The model width as :func:`layerwise.anatomy` reads it (``config.hidden_size`` / ``d_model`` / ``n_embd``,
    else the most common dimension of the block matrices); ``None`` if neither exists."""
    from layerwise.anatomy import anatomy

    return anatomy(model).width


def _tied_readouts(an: Any, classes: Mapping[str, str | None]) -> list[str]:
    """Modules (canonical names) that use an input-like tensor as their weight: a tied LM head."""
    out = []
    for row in an:
        if len(row.names) < 2 or classes.get(row.name) != "embedding":
            continue
        for alias in row.names[1:]:
            mod_name = alias.rsplit(".", 1)[0] if "." in alias else ""
            try:
                mod = an.module(mod_name)
            except KeyError:
                continue
            if not isinstance(mod, nn.Embedding):
                out.append(mod_name)
    return out


@dataclass(frozen=True)
class WidthScaling:
    """μP width scaling of (lr, weight decay, init, readout, attention) per class or per tensor.

    Args:
        base_width: the proxy's width ``d_base`` (hidden size) at which the base (lr, λ) were tuned.
        width: the target model's width ``d``; ``m = width / base_width`` (the global rule's multiplier).
        lr_exponent: matrix-like LR × ``m_in^(−lr_exponent)`` (μP for Adam: 1.0).
        wd_exponent: matrix-like λ × ``m_in^(wd_exponent)`` (coupled convention); 0.5 = Fan et al. (λ ∝ √d,
            per-step shrink ``lr·λ ∝ m^(−1/2)``), 1.0 = mup's MuAdamW (``lr·λ`` constant), 0.0 = plain μP.
        embedding_lr_exponent: input-like LR × ``m_out^(−embedding_lr_exponent)``; 0.0 = μP for Adam.
        embedding_wd_exponent: input-like λ × ``m_out^(embedding_wd_exponent)``; 0.0 = λ unchanged.
        readout: ``"multiplier"`` (the model multiplies the head's input by 1/m_in, mup ``MuReadout``; head
            LR unchanged) or ``"lr"`` (no multiplier; head LR × ``m_in^(−lr_exponent)``, init std / m_in).
        wd_convention: ``"coupled"`` (PyTorch's ``θ ← θ·(1 − lr·λ)``; the factors above are on that λ) or
            ``"independent"`` (``θ ← θ·(1 − s_t·λ)``, ``s_t = lr_t / lr_peak``; the λ of a class is multiplied
            by :meth:`shrink_mult`, so both conventions give the same training).  See the module docstring.
        tensors: per-tensor shapes and multipliers (:meth:`from_models` fills it; ``None`` = the global rule).
        attention: head sizes of the attention sub-layers in base and model (:meth:`from_models`).

    ``base_width == width`` (global rule) gives factors of exactly 1.0.
    """

    base_width: int
    width: int
    lr_exponent: float = 1.0
    wd_exponent: float = 0.5
    embedding_lr_exponent: float = 0.0
    embedding_wd_exponent: float = 0.0
    readout: str = "multiplier"
    wd_convention: str = "coupled"
    tensors: tuple[TensorScaling, ...] | None = field(default=None, repr=False)
    attention: tuple[AttentionScaling, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_width", _positive_width("base_width", self.base_width))
        object.__setattr__(self, "width", _positive_width("width", self.width))
        for name in ("lr_exponent", "wd_exponent", "embedding_lr_exponent", "embedding_wd_exponent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"WidthScaling.{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.readout not in ("multiplier", "lr"):
            raise ValueError(f"WidthScaling.readout must be 'multiplier' or 'lr', got {self.readout!r}")
        if self.wd_convention not in WD_CONVENTIONS:
            raise ValueError(f"WidthScaling.wd_convention must be one of {WD_CONVENTIONS}, got {self.wd_convention!r}")
        by_name: dict[str, TensorScaling] = {}
        if self.tensors is not None:
            object.__setattr__(self, "tensors", tuple(self.tensors))
            for t in self.tensors:
                if not isinstance(t, TensorScaling):
                    raise TypeError(f"WidthScaling.tensors must hold TensorScaling records, got {type(t).__name__}")
                by_name.update(dict.fromkeys(t.names, t))
        if self.attention is not None:
            object.__setattr__(self, "attention", tuple(self.attention))
        object.__setattr__(self, "_by_name", by_name)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_parametrization(cls, name: str, base_width: int, width: int, **overrides: Any) -> WidthScaling | None:
        """The rule for a named parametrisation: ``"sp"`` -> ``None`` (no scaling), ``"mup"`` (λ constant),
        ``"mup-sqrtwd"`` (λ ∝ √d, Fan et al.), ``"mup-lrwd"`` (lr·λ constant, mup's MuAdamW)."""
        if name not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {name!r}; choose one of {sorted(PARAMETRIZATIONS)}")
        preset = PARAMETRIZATIONS[name]
        if preset is None:
            if overrides:
                raise ValueError(f"parametrization 'sp' takes no WidthScaling options, got {sorted(overrides)}")
            return None
        return cls(base_width=base_width, width=width, **{**preset, **overrides})

    @classmethod
    def from_models(
        cls,
        model: nn.Module | Mapping[str, torch.Tensor],
        base: nn.Module | Mapping[str, torch.Tensor],
        delta: nn.Module | Mapping[str, torch.Tensor] | None = None,
        **options: Any,
    ) -> WidthScaling:
        """The per-tensor rule of ``model`` against a ``base`` built at the proxy width (μP's base shapes).

        ``base`` (and ``delta``) are modules or state dicts, ideally built on the ``meta`` device
        (``with torch.device("meta"): base = Model(base_config)``): only shapes are read.  With ``delta`` (a
        third model differing from the base in every width dimension, e.g. at twice the base width), a
        dimension scales iff it differs between base and delta (mup's rule); without one, iff it differs
        between base and model.  See :mod:`layerwise.scaling.shapes` for the classes and the errors (names
        differ, a dimension shrinks from base to model, ...: ``ValueError`` naming the tensor).

        ``options``: the other fields of :class:`WidthScaling` (``wd_exponent=0.5``, ``lr_exponent``,
        ``embedding_lr_exponent``, ``embedding_wd_exponent``, ``readout``, ``wd_convention``).  ``base_width`` /
        ``width`` are read from the two models (``config.hidden_size``, else the block matrices; else the
        most frequent width dimension) and only describe the rule: every factor uses the tensor's own
        multipliers.  ``readout="lr"`` with an LM head tied to the embedding is an error (one tensor cannot
        take both LRs; use ``"multiplier"``).
        """
        from layerwise.scaling.shapes import (
            attention_head_dims,
            compare_shapes,
            most_common_width,
            unrecognised_head_growth,
        )

        bad = {"base_width", "width", "tensors", "attention"} & set(options)
        if bad:
            raise TypeError(f"WidthScaling.from_models reads {sorted(bad)} from the models; do not pass them")
        records, an, base_an = compare_shapes(model, base, delta)
        if options.get("readout", "multiplier") == "lr":
            tied = _tied_readouts(an, {r.name: r.param_class for r in records})
            if tied:
                raise ValueError(
                    f"WidthScaling.from_models: readout='lr' but the output layer {tied[0]!r} is tied to the input "
                    "embedding (one tensor cannot take the embedding's LR and the head's); use "
                    "readout='multiplier' or untie the weights"
                )
        if an.width is not None and base_an.width is not None:
            base_width, width = base_an.width, an.width
        else:
            pair = most_common_width(records)
            base_width, width = pair if pair is not None else (an.width or 1, an.width or 1)
        heads, base_heads = attention_head_dims(an), attention_head_dims(base_an)
        attention = tuple(AttentionScaling(mod, base_heads.get(mod), hd) for mod, hd in heads.items())
        unseen = unrecognised_head_growth(an, base_an, heads)
        if unseen:
            warnings.warn(
                "WidthScaling.from_models: the head size grows in modules layerwise.anatomy does not recognise "
                f"as attention, so apply_ will not set μP's attention scale there: {', '.join(unseen[:8])}"
                + (" ..." if len(unseen) > 8 else ""),
                UserWarning,
                stacklevel=2,
            )
        return cls(base_width, width, **options, tensors=tuple(records), attention=attention)

    # -- per-tensor look-ups ------------------------------------------------------------------------
    @property
    def per_tensor(self) -> bool:
        """True for a rule built by :meth:`from_models` (per-tensor multipliers)."""
        return self.tensors is not None

    @property
    def width_mult(self) -> float:
        """m = width / base_width (the global rule's multiplier; for a per-tensor rule, the hidden size's)."""
        return self.width / self.base_width

    def tensor(self, name: str) -> TensorScaling | None:
        """The per-tensor record of a (raw or canonical) parameter name; ``None`` for the global rule or an
        unknown name."""
        by_name: dict[str, TensorScaling] = self._by_name  # type: ignore[attr-defined]
        return by_name.get(canonical_name(name))

    def param_class(self, info: ParamInfo) -> str | None:
        """The class of an anatomy row under this rule: from the shapes for a per-tensor rule (a tensor the
        rule does not know: from its role), from the role (:func:`width_class`) for the global rule."""
        rec = self.tensor(info.name) if self.per_tensor else None
        return rec.param_class if rec is not None else width_class(info)

    def multipliers(self, param_class: str, name: str | None = None) -> tuple[float, float]:
        """``(m_in, m_out)`` of a tensor: its own for a per-tensor rule (``name`` required), ``(m, m)`` for the
        global rule.  A per-tensor rule accepts unknown names only for classes whose factors are 1 (vectors,
        multipliers added after the rule was built)."""
        _check_class(param_class)
        if not self.per_tensor:
            return self.width_mult, self.width_mult
        if name is None:
            raise ValueError("this WidthScaling is per tensor (from_models): pass the parameter name")
        rec = self.tensor(name)
        if rec is not None:
            return rec.m_in, rec.m_out
        if param_class in ("vector", "multiplier", "unscaled"):
            return 1.0, 1.0
        raise ValueError(
            f"WidthScaling: parameter {name!r} ({param_class}) is not in this rule, which was built by "
            f"from_models from {len(self.tensors or ())} tensors; build the rule from the model as it is "
            "trained (after any change that adds parameters)"
        )

    # -- factors ------------------------------------------------------------------------------------
    def _coupled(self, param_class: str, name: str | None) -> tuple[float, float]:
        """(LR factor, coupled λ factor) of a tensor: the one place the rule's formulas live."""
        m_in, m_out = self.multipliers(param_class, name)
        if param_class == "matrix":
            return _power(m_in, -self.lr_exponent), _power(m_in, self.wd_exponent)
        if param_class == "readout":
            return (_power(m_in, -self.lr_exponent) if self.readout == "lr" else 1.0), 1.0
        if param_class == "embedding":
            return _power(m_out, -self.embedding_lr_exponent), _power(m_out, self.embedding_wd_exponent)
        return 1.0, 1.0

    def lr_mult(self, param_class: str, name: str | None = None) -> float:
        """Factor on the base LR for a class (global rule) or a tensor (per-tensor rule: pass ``name``)."""
        return self._coupled(param_class, name)[0]

    def wd_mult(self, param_class: str, name: str | None = None) -> float:
        """Factor on the base weight decay λ, in this rule's ``wd_convention``: coupled (PyTorch's
        ``θ ← θ·(1 − lr·λ)``): ``m_in^(wd_exponent)`` for matrices; independent (``θ ← θ·(1 − s_t·λ)``):
        :meth:`shrink_mult`, the same per-step physics."""
        lr_f, wd_f = self._coupled(param_class, name)
        return lr_f * wd_f if self.wd_convention == "independent" else wd_f

    def shrink_mult(self, param_class: str, name: str | None = None) -> float:
        """Factor on the per-step decay shrink (coupled ``lr·λ``): ``m_in^(wd_exponent − lr_exponent)`` for
        matrices; the same in both conventions."""
        lr_f, wd_f = self._coupled(param_class, name)
        return lr_f * wd_f

    def init_std(self, param_class: str, base_std: float, name: str | None = None) -> float:
        """:func:`init_std` at this rule's fan-in multiplier (the tensor's own for a per-tensor rule)."""
        m_in = self.multipliers(param_class, name)[0]
        return init_std(param_class, base_std, m_in, readout=self.readout)

    def init_mult(self, param_class: str, name: str | None = None, *, init: str = "constant") -> float:
        """Factor :meth:`apply_` multiplies a weight by: μP's init std relative to the model's own.

        ``init="constant"``: the model's init std does not depend on width (Hugging Face's
        ``initializer_range``) -> ``m_in^(−1/2)`` for matrices, ``m_in^(−1)`` for an output layer under
        ``readout="lr"``, 1 otherwise.  ``init="fan_in"``: the model's init std is ∝ 1/sqrt(fan_in) (PyTorch's
        default ``nn.Linear`` init) -> 1 for matrices, ``m_in^(1/2)`` for an output layer under
        ``readout="multiplier"`` (as mup's ``MuReadout`` rescale), ``m_in^(−1/2)`` under ``"lr"``.
        ``init="keep"``: 1 (trained weights).  Other classes: 1 (their fan-in does not grow).
        """
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        _check_class(param_class)
        if init == "keep" or param_class not in ("matrix", "readout"):
            return 1.0
        m_in = self.multipliers(param_class, name)[0]
        current = 0.5 if init == "fan_in" else 0.0
        return _power(m_in, current - _init_exponent(param_class, self.readout))

    def table(self) -> dict[str, dict[str, float]]:
        """``{class: {"lr_mult", "wd_mult", "shrink_mult"}}`` at the global ``m`` (for a per-tensor rule: the
        factors a tensor whose width dimensions grow as the hidden size would get; see :meth:`tensor_table`)."""
        glob = replace(self, tensors=None, attention=None)
        return {
            c: {"lr_mult": glob.lr_mult(c), "wd_mult": glob.wd_mult(c), "shrink_mult": glob.shrink_mult(c)}
            for c in PARAM_CLASSES
        }

    def tensor_table(self) -> list[dict[str, Any]]:
        """One row per tensor of a per-tensor rule: name, shape, base shape, class, ``m_in``, ``m_out``,
        ``lr_mult``, ``wd_mult``, ``init_mult`` (for a constant init); ``[]`` for the global rule."""
        rows = []
        for t in self.tensors or ():
            row: dict[str, Any] = {
                "name": t.name,
                "shape": list(t.shape),
                "base_shape": list(t.base_shape),
                "param_class": t.param_class,
                "m_in": t.m_in,
                "m_out": t.m_out,
            }
            if t.param_class is not None:
                row.update(
                    lr_mult=self.lr_mult(t.param_class, t.name),
                    wd_mult=self.wd_mult(t.param_class, t.name),
                    init_mult=self.init_mult(t.param_class, t.name),
                )
            rows.append(row)
        return rows

    # -- consistency --------------------------------------------------------------------------------
    def check_model(self, model: nn.Module | Iterable[tuple[str, torch.Tensor]], an: Any = None) -> None:
        """Raise ``ValueError`` when the model does not fit the rule.

        Global rule: when the model's hidden size is readable (modules only) and differs from ``width``.
        Per-tensor rule: when a parameter's shape differs from the one the rule was built from, or a parameter
        the rule does not know is not vector-like (``an``: the model's anatomy, if already computed).
        """
        if not self.per_tensor:
            if isinstance(model, nn.Module):
                hidden = _model_width(model)
                if hidden is not None and hidden != self.width:
                    raise ValueError(
                        f"WidthScaling.width={self.width} does not match the model's hidden size {hidden} "
                        "(model.config.hidden_size, else the block matrices' width); build the rule with "
                        f"width={hidden}"
                    )
            return
        named = list(model.named_parameters()) if isinstance(model, nn.Module) else list(model)
        for raw, p in named:
            name = canonical_name(raw)
            rec = self.tensor(name)
            if rec is None:
                if an is None:
                    from layerwise.anatomy import anatomy

                    an = anatomy(model if isinstance(model, nn.Module) else dict(named))
                info = an.get(name)
                if info is None or not (info.vector_like or info.role == "multiplier"):
                    raise ValueError(
                        f"WidthScaling: parameter {name!r} (shape {list(p.shape)}) is not in this per-tensor rule; "
                        "build the rule with from_models from the model as it is trained"
                    )
            elif tuple(p.shape) != rec.shape:
                raise ValueError(
                    f"WidthScaling: parameter {name!r} has shape {list(p.shape)} but the rule was built for "
                    f"{list(rec.shape)}; build the rule with from_models from this model"
                )

    # -- the model-side half ------------------------------------------------------------------------
    def apply_(self, model: nn.Module, *, init: str = "constant") -> dict[str, Any]:
        """μP on the model itself, in place: init rescaling, the readout multiplier, the attention scale.

        See :func:`layerwise.scaling.model_side.apply_` (this method calls it).  Returns what was done.
        """
        from layerwise.scaling.model_side import apply_

        return apply_(self, model, init=init)

    def fold_(self, model: nn.Module) -> dict[str, Any]:
        """Fold the readout multiplier and attention scale :meth:`apply_` attached into plain weights, so a
        saved / exported checkpoint computes the same function without hooks.  See
        :func:`layerwise.scaling.model_side.fold_`."""
        from layerwise.scaling.model_side import fold_

        return fold_(self, model)
