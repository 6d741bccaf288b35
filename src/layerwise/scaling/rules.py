"""Width scaling rules: μP with a weight-decay exponent (Fan et al., arXiv 2510.15262).

Parameter classes
-----------------
Every parameter falls in one class, decided from its :mod:`layerwise.anatomy` role (never from attributes on
the ``Parameter`` object, never guessed from a class name here).  The classes count how many of a tensor's
dimensions grow with the model width ``d``:

==============  =========================================================================  ==================
class           anatomy roles                                                              width dimensions
==============  =========================================================================  ==================
``matrix``      ``block_matrix`` (q/k/v/o, qkv, gate/up/down, SSM in/out), ``matrix``,      two (fan_in and
                a full (non-depthwise) ``conv``                                            fan_out)
``embedding``   ``embedding`` (token, token-type), ``position_embedding``, ``input``        one (fan_out = d)
``readout``     ``readout`` (the LM head / classifier)                                     one (fan_in = d)
``vector``      ``norm``, ``bias``, ``ssm_vector`` (A_log, D, dt_bias), depthwise ``conv``  one (or none)
``multiplier``  ``multiplier`` (``*.row_multiplier`` ...); vector-like                      one (or none)
==============  =========================================================================  ==================

A tied embedding / LM head is one tensor with role ``embedding``.  Role ``other`` (unclassified) has no class:
:func:`width_class` returns ``None`` and :func:`layerwise.param_groups` with a width rule raises, listing the
tensors and how to pass a rule for them.

The rule (``m = width / base_width``)
-------------------------------------
Weight decay is PyTorch's **coupled** convention: one AdamW step does ``θ ← θ·(1 − lr·λ)`` (plus the Adam
update).  :class:`WidthScaling` multiplies the base hyper-parameters ``(lr, λ)`` per class:

* ``matrix``: ``lr × m^(−lr_exponent)``, ``λ × m^(wd_exponent)``; init variance ∝ 1/fan_in.
  The per-step shrink factor ``lr·λ`` therefore scales as ``m^(wd_exponent − lr_exponent)``:

  - ``wd_exponent=0.5`` (default, Fan et al.'s λ ∝ √d): ``lr·λ ∝ m^(−1/2)``;
  - ``wd_exponent=1.0``: ``lr·λ`` constant — mup's ``MuAdamW`` with its default ``decoupled_wd=False``
    (it divides the LR of matrix-like parameters by m and multiplies their λ by m);
  - ``wd_exponent=0.0``: plain μP, λ unchanged, ``lr·λ ∝ 1/m``.

* ``vector`` and ``multiplier``: LR unchanged, weight decay not width-scaled.  :func:`layerwise.param_groups`
  gives vectors λ = 0 and multipliers their own ``multiplier_weight_decay`` (width independent).
* ``embedding`` (μP for Adam, input weights): LR × ``m^(−embedding_lr_exponent)`` (default exponent 0: LR
  unchanged), λ × ``m^(embedding_wd_exponent)`` (default 0: the base λ, unchanged).  *Documented choice*:
  an embedding row has Θ(1) coordinates and Θ(1) Adam updates at every width, so a width-independent
  (lr, λ) keeps its AdamW equilibrium width-independent; Fan et al. count embeddings as vector-like and do not
  decay them at all — get that with ``param_groups(..., no_decay=("norm", "bias", "multiplier", "embed"))``.
  Init std unchanged.
* ``readout`` with ``readout="multiplier"`` (default; mup's ``MuReadout`` convention, what
  ``layerwise.lab.model`` does under ``parametrization="mup"``): the model multiplies the logits by ``1/m``;
  then the head's Adam LR is **unchanged**, λ unchanged, init std unchanged (the effective weight
  ``W/m`` has variance ∝ 1/m², μP's 1/fan_in² for the output layer).  With ``readout="lr"`` the model has no
  output multiplier and the head's LR is scaled like a matrix's, ``lr × m^(−lr_exponent)`` (λ unchanged);
  its init std should then be ``base_std / m`` (see :func:`init_std`).
* Attention: μP uses a ``1/head_dim`` logit scale instead of ``1/sqrt(head_dim)`` when the head dimension
  grows with width; that is a model option (``ModelConfig.attn_scale="mup"``), not an optimizer rule.

``base_width == width`` is the identity: every factor is exactly 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from layerwise.anatomy import ParamInfo

#: The parameter classes, in a fixed order (also the order of the groups built by ``param_groups``).
PARAM_CLASSES: tuple[str, ...] = ("embedding", "matrix", "readout", "vector", "multiplier")

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
    else ``matrix``.
    """
    if not isinstance(info, ParamInfo):
        raise TypeError(f"width_class expects a layerwise.anatomy.ParamInfo, got {type(info).__name__}")
    if info.role == "conv":
        return "vector" if info.depthwise else "matrix"
    return _ROLE_CLASS.get(info.role)


def _check_class(param_class: str) -> None:
    if param_class not in PARAM_CLASSES:
        raise ValueError(f"unknown parameter class {param_class!r}; choose one of {PARAM_CLASSES}")


def init_std(param_class: str, base_std: float, m: float, *, readout: str = "multiplier") -> float:
    """μP initial standard deviation at width multiplier ``m`` for a class whose base-width std is ``base_std``.

    Init variance ∝ 1/fan_in for matrix-like parameters (both dimensions grow, fan_in ∝ m):
    ``matrix -> base_std / sqrt(m)``.  Embedding, vector and multiplier: ``base_std`` (fan_in does not grow).
    Readout: ``base_std`` with ``readout="multiplier"`` (the model's 1/m logit multiplier makes the effective
    variance ∝ 1/m²), ``base_std / m`` with ``readout="lr"`` (no multiplier: variance ∝ 1/fan_in², μP's
    output-layer init).
    """
    _check_class(param_class)
    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        raise ValueError(f"width multiplier m must be a positive finite number, got {m!r}")
    if not (isinstance(base_std, (int, float)) and base_std >= 0):
        raise ValueError(f"base_std must be a non-negative number, got {base_std!r}")
    if readout not in ("multiplier", "lr"):
        raise ValueError(f"readout must be 'multiplier' or 'lr', got {readout!r}")
    if param_class == "matrix":
        return base_std / math.sqrt(m)
    if param_class == "readout" and readout == "lr":
        return base_std / m
    return float(base_std)


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


@dataclass(frozen=True)
class WidthScaling:
    """μP width scaling of (lr, weight decay) per parameter class, with a weight-decay exponent.

    Args:
        base_width: the proxy's width ``d_base`` (hidden size) at which the base (lr, λ) were tuned.
        width: the target model's width ``d``; ``m = width / base_width``.
        lr_exponent: matrix-like LR × ``m^(−lr_exponent)`` (μP for Adam: 1.0).
        wd_exponent: matrix-like λ × ``m^(wd_exponent)``; 0.5 = Fan et al. (λ ∝ √d, per-step shrink
            ``lr·λ ∝ m^(−1/2)``), 1.0 = mup's MuAdamW (``lr·λ`` constant), 0.0 = plain μP (λ constant).
        embedding_lr_exponent: embedding LR × ``m^(−embedding_lr_exponent)``; 0.0 = μP for Adam.
        embedding_wd_exponent: embedding λ × ``m^(embedding_wd_exponent)``; 0.0 = λ unchanged.
        readout: ``"multiplier"`` (the model multiplies logits by 1/m, mup ``MuReadout``; head LR unchanged)
            or ``"lr"`` (no multiplier; head LR × ``m^(−lr_exponent)``).

    Weight decay is PyTorch's coupled convention ``θ ← θ·(1 − lr·λ)``.  See the module docstring for every
    class.  ``base_width == width`` gives factors of exactly 1.0.
    """

    base_width: int
    width: int
    lr_exponent: float = 1.0
    wd_exponent: float = 0.5
    embedding_lr_exponent: float = 0.0
    embedding_wd_exponent: float = 0.0
    readout: str = "multiplier"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_width", _positive_width("base_width", self.base_width))
        object.__setattr__(self, "width", _positive_width("width", self.width))
        for field in ("lr_exponent", "wd_exponent", "embedding_lr_exponent", "embedding_wd_exponent"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"WidthScaling.{field} must be a finite number, got {v!r}")
            object.__setattr__(self, field, float(v))
        if self.readout not in ("multiplier", "lr"):
            raise ValueError(f"WidthScaling.readout must be 'multiplier' or 'lr', got {self.readout!r}")

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

    # -- factors ------------------------------------------------------------------------------------
    @property
    def width_mult(self) -> float:
        """m = width / base_width."""
        return self.width / self.base_width

    def _pow(self, exponent: float) -> float:
        # exact 1.0 at m = 1 (and for exponent 0), so base_width == width is the identity
        if self.width == self.base_width or exponent == 0.0:
            return 1.0
        return float(self.width_mult**exponent)

    def lr_mult(self, param_class: str) -> float:
        """Factor on the base LR for a parameter class."""
        _check_class(param_class)
        if param_class == "matrix" or (param_class == "readout" and self.readout == "lr"):
            return self._pow(-self.lr_exponent)
        if param_class == "embedding":
            return self._pow(-self.embedding_lr_exponent)
        return 1.0

    def wd_mult(self, param_class: str) -> float:
        """Factor on the base weight decay λ for a parameter class (coupled convention)."""
        _check_class(param_class)
        if param_class == "matrix":
            return self._pow(self.wd_exponent)
        if param_class == "embedding":
            return self._pow(self.embedding_wd_exponent)
        return 1.0

    def shrink_mult(self, param_class: str) -> float:
        """Factor on the per-step decay shrink lr·λ: ``lr_mult · wd_mult``
        (``m^(wd_exponent − lr_exponent)`` for matrices)."""
        return self.lr_mult(param_class) * self.wd_mult(param_class)

    def init_std(self, param_class: str, base_std: float) -> float:
        """:func:`init_std` at this rule's ``m`` and readout convention."""
        return init_std(param_class, base_std, self.width_mult, readout=self.readout)

    def table(self) -> dict[str, dict[str, float]]:
        """``{class: {"lr_mult", "wd_mult", "shrink_mult"}}`` for logging and docs."""
        return {
            c: {"lr_mult": self.lr_mult(c), "wd_mult": self.wd_mult(c), "shrink_mult": self.shrink_mult(c)}
            for c in PARAM_CLASSES
        }

    # -- consistency --------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when the model's hidden size is readable and differs from ``width``."""
        hidden = _model_width(model)
        if hidden is not None and hidden != self.width:
            raise ValueError(
                f"WidthScaling.width={self.width} does not match the model's hidden size {hidden} "
                f"(model.config.hidden_size, else the block matrices' width); build the rule with width={hidden}"
            )
