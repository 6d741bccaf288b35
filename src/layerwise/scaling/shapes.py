"""Which dimensions of every parameter grow with width: shapes of a model against a base (and a delta) model.

This is the shape half of μP's ``set_base_shapes`` (Yang et al.; the ``mup`` package), keyed by canonical
parameter name instead of an ``infshape`` attribute on each ``Parameter`` (attributes vanish under
``fully_shard`` and are not seen through ``torch.compile``).  Only shapes are read, never values, so the base
and the delta can live on the ``meta`` device.

For every tensor of the model (:class:`TensorScaling`):

* **width dimensions**: with a ``delta`` model, a dimension is a width dimension iff it differs between base
  and delta (mup's rule: the delta only says *which* dimensions scale); without one, iff it differs between
  base and model.  A width dimension's multiplier is ``model dim / base dim``; every other dimension must be
  equal in base and model.
* **fan-in / fan-out multipliers** ``m_in`` / ``m_out``: the product of the multipliers over the tensor's
  fan-in / fan-out dimensions, read from the model's :mod:`layerwise.anatomy` layout (``nn.Linear``
  ``(out, in)``, Hugging Face ``Conv1D`` ``(in, out)``, embedding tables ``(num_embeddings, dim)`` - the
  fan-in is the one-hot vocabulary, convolutions ``(out, in/groups, *kernel)``).  A vector's one dimension
  counts as fan-out; a tensor the anatomy does not classify is read as ``(out, in, ...)``.
* **class** (:data:`layerwise.scaling.PARAM_CLASSES`): anatomy's vector-like roles (norms, biases, SSM
  vectors, depthwise convolutions) -> ``"vector"``, learnable multipliers -> ``"multiplier"``, role ``other``
  -> ``None`` (unclassified: :func:`layerwise.param_groups` asks for a rule); every other tensor by which
  sides scale: both -> ``"matrix"``, fan-out only -> ``"embedding"`` (input-like: embeddings, position
  tables, a first layer of fixed fan-in), fan-in only -> ``"readout"`` (output-like: the LM head, a
  classifier, an MoE router), neither -> ``"unscaled"`` (every factor exactly 1).

Errors (``ValueError``, naming the tensor): a name in one model and not the other, a different number of
dimensions, a dimension that changes between base and model but is not a width dimension according to the
delta, and a width dimension that *shrinks* from base to model (the base is the narrow proxy; a swapped pair
would otherwise silently multiply every matrix learning rate by m).  Non-integer multipliers (768 -> 1024)
are valid μP and accepted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from layerwise import anatomy as _anatomy
from layerwise.anatomy import ParamInfo

__all__ = [
    "TensorScaling",
    "AttentionScaling",
    "compare_shapes",
    "attention_head_dims",
    "most_common_width",
    "unrecognised_head_growth",
]


@dataclass(frozen=True)
class TensorScaling:
    """How one tensor scales between the base model and this model (see the module docstring)."""

    name: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    width_dims: tuple[bool, ...]
    m_in: float
    m_out: float
    param_class: str | None
    role: str

    @property
    def scaled(self) -> bool:
        """Whether any dimension is a width dimension."""
        return any(self.width_dims)


@dataclass(frozen=True)
class AttentionScaling:
    """An attention sub-layer (canonical module name) and its head size in the base and in this model
    (``None`` where neither the module nor the config says)."""

    module: str
    base_head_dim: int | None
    head_dim: int | None

    @property
    def factor(self) -> float | None:
        """μP's change of the attention-logit scale, ``sqrt(base_head_dim / head_dim)`` (see
        :meth:`layerwise.WidthScaling.apply_`); ``None`` when a head size is unknown."""
        if self.base_head_dim is None or self.head_dim is None:
            return None
        if self.base_head_dim == self.head_dim:
            return 1.0
        return math.sqrt(self.base_head_dim / self.head_dim)


def _shapes(obj: nn.Module | Mapping[str, Any], what: str) -> tuple[dict[str, tuple[int, ...]], _anatomy.Anatomy]:
    if not isinstance(obj, (nn.Module, Mapping)):
        raise TypeError(
            f"WidthScaling.from_models: {what} must be an nn.Module or a state dict, got {type(obj).__name__}"
        )
    an = _anatomy.anatomy(obj)
    return {n: tuple(int(s) for s in r.shape) for r in an for n in r.names}, an


def _dims(info: ParamInfo) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(fan-in dims, fan-out dims) of a tensor, from its anatomy layout."""
    nd = len(info.shape)
    if nd == 0:
        return (), ()
    if nd == 1:
        return (), (0,)
    if info.layout in ("in_out", "table"):
        return (0,), (1,)
    return tuple(range(1, nd)), (0,)  # out_in, assumed_out_in, conv, and unclassified tensors


def _mult(shape: tuple[int, ...], base: tuple[int, ...], dims: tuple[int, ...]) -> float:
    num = math.prod(shape[i] for i in dims)
    den = math.prod(base[i] for i in dims)
    return 1.0 if num == den else num / den


def _class(info: ParamInfo, scales_in: bool, scales_out: bool) -> str | None:
    if info.role == "multiplier":
        return "multiplier"
    if info.role == "other":
        return None
    if info.vector_like:
        return "vector"
    if scales_in and scales_out:
        return "matrix"
    if scales_out:
        return "embedding"
    if scales_in:
        return "readout"
    return "unscaled"


def _name_list(names: set[str]) -> str:
    s = sorted(names)
    return ", ".join(s[:8]) + (f" ... ({len(s)} in all)" if len(s) > 8 else "")


def compare_shapes(
    model: nn.Module | Mapping[str, Any],
    base: nn.Module | Mapping[str, Any],
    delta: nn.Module | Mapping[str, Any] | None = None,
) -> tuple[list[TensorScaling], _anatomy.Anatomy, _anatomy.Anatomy]:
    """``([TensorScaling per tensor], anatomy of the model, anatomy of the base)``; see the module docstring.

    A tied tensor has one record holding all its names.  Raises ``ValueError`` naming the tensor for every
    inconsistency listed in the module docstring.
    """
    shapes, an = _shapes(model, "model")
    base_shapes, base_an = _shapes(base, "base")
    delta_shapes = _shapes(delta, "delta")[0] if delta is not None else None
    for other, label in ((base_shapes, "base"), (delta_shapes, "delta")):
        if other is None:
            continue
        missing, extra = set(shapes) - set(other), set(other) - set(shapes)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing in the {label}: {_name_list(missing)}")
            if extra:
                parts.append(f"only in the {label}: {_name_list(extra)}")
            raise ValueError(
                f"WidthScaling.from_models: the model and the {label} have different parameters ("
                + "; ".join(parts)
                + "); build both from the same code at two widths"
            )
    out: list[TensorScaling] = []
    for info in an:
        shape = tuple(int(s) for s in info.shape)
        b = base_shapes[info.name]
        d = delta_shapes[info.name] if delta_shapes is not None else None
        for got, label in ((b, "base"), (d, "delta")):
            if got is not None and len(got) != len(shape):
                raise ValueError(
                    f"WidthScaling.from_models: {info.name} has shape {list(shape)} in the model but "
                    f"{list(got)} in the {label} (a different number of dimensions)"
                )
        width = []
        for i, (s, bs) in enumerate(zip(shape, b)):
            is_width = (bs != d[i]) if d is not None else (bs != s)
            if not is_width and s != bs:
                raise ValueError(
                    f"WidthScaling.from_models: dimension {i} of {info.name} is {s} in the model and {bs} in the "
                    f"base, but the same in the base and the delta ({bs}), so the delta says it does not scale "
                    "with width; build the delta with every width dimension changed"
                )
            if is_width and s < bs:
                raise ValueError(
                    f"WidthScaling.from_models: dimension {i} of {info.name} shrinks from {bs} in the base to {s} "
                    "in the model; the base must be the narrow proxy the hyper-parameters were tuned on "
                    "(were model and base swapped?)"
                )
            width.append(is_width)
        din, dout = _dims(info)
        m_in = _mult(shape, b, tuple(i for i in din if width[i]))
        m_out = _mult(shape, b, tuple(i for i in dout if width[i]))
        scales_in = any(width[i] for i in din)
        scales_out = any(width[i] for i in dout)
        rec = TensorScaling(
            name=info.name,
            names=tuple(info.names),
            shape=shape,
            base_shape=tuple(b),
            width_dims=tuple(width),
            m_in=m_in,
            m_out=m_out,
            param_class=_class(info, scales_in, scales_out),
            role=info.role,
        )
        out.append(rec)
    return out, an, base_an


def _config_head_dim(model: nn.Module | None) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    hd = getattr(cfg, "head_dim", None)
    if isinstance(hd, int) and not isinstance(hd, bool) and hd > 0:
        return hd
    width, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads == 0:
        return width // heads
    return None


def _module_head_dim(module: nn.Module) -> int | None:
    """The head size an attention module (or the first of its sub-modules that has one) declares."""
    for mod in module.modules():
        for attr in ("head_dim", "head_size", "attention_head_size"):
            v = getattr(mod, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def attention_head_dims(an: _anatomy.Anatomy) -> dict[str, int | None]:
    """``{attention module: head size}`` of an analysed module (the module's ``head_dim`` / ``head_size`` /
    ``attention_head_size``, else the config's ``head_dim`` or ``hidden_size / num_attention_heads``; ``None``
    when unreadable).  Empty for a state dict or a model without attention sub-layers."""
    if an.source != "module":
        return {}
    try:
        root = an.module("")
    except KeyError:
        root = None
    out: dict[str, int | None] = {}
    for b in an.blocks():
        if b.attention is None:
            continue
        out[b.attention] = _module_head_dim(an.module(b.attention)) or _config_head_dim(root)
    return out


def most_common_width(records: Iterable[TensorScaling]) -> tuple[int, int] | None:
    """(base, model) size of the most frequent width dimension over the tensors; ``None`` if none scales."""
    pairs: Counter[tuple[int, int]] = Counter()
    for r in records:
        for s, b, w in zip(r.shape, r.base_shape, r.width_dims):
            if w:
                pairs[(b, s)] += 1
    return pairs.most_common(1)[0][0] if pairs else None


def unrecognised_head_growth(an: _anatomy.Anatomy, base_an: _anatomy.Anatomy, known: Iterable[str]) -> list[str]:
    """Modules outside the recognised attention sub-layers ``known`` whose own ``head_dim`` / ``head_size`` /
    ``attention_head_size`` grows from the base to the model (``"name (base -> model)"``): attention that
    :func:`layerwise.anatomy` does not see, whose logit scale μP would change but nothing sets."""
    if an.source != "module" or base_an.source != "module":
        return []
    from layerwise.names import canonical_name

    def own_head_dims(root: nn.Module) -> dict[str, int]:
        out = {}
        for name, mod in root.named_modules():
            for attr in ("head_dim", "head_size", "attention_head_size"):
                v = vars(mod).get(attr)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    out[canonical_name(name)] = v
                    break
        return out

    def ssm(name: str) -> bool:  # a state-space mixer's heads (Mamba: A_log, D, conv) have no logit scale
        return any(m == name or m.startswith(name + ".") for m in ssm_modules)

    ssm_modules = {r.module for r in an if r.role in ("ssm_vector", "conv")}
    prefixes = tuple(k + "." for k in known)
    model_dims, base_dims = own_head_dims(an.module("")), own_head_dims(base_an.module(""))
    return [
        f"{name or '<root>'} ({base_dims[name]} -> {hd})"
        for name, hd in model_dims.items()
        if name not in known
        and not name.startswith(prefixes)
        and name in base_dims
        and base_dims[name] != hd
        and not ssm(name)
    ]
