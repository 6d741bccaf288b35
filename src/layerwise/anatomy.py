"""What every parameter of a model is: the one place in layerwise that knows model structure.

Every method (spectral analysis, AlphaDecay and its baselines, multipliers, parameter groups, width scaling,
the diagnostics) asks this module what a parameter is; none of them guesses from class or module names.

Use
---
::

    import layerwise as lw
    an = lw.anatomy(model)            # any nn.Module, or a state dict {name: tensor}
    print(an.to_markdown())           # one row per tensor: name, role, block, operator, fan_in, fan_out, ...
    an.block_matrices()               # the rows AlphaDecay / analyze(select="blocks") work on
    an.by_name("lm_head.weight")      # the row of a name (any of a tied tensor's names)
    an.of(param)                      # the row of a tensor (modules only)
    an.unclassified()                 # rows with role "other": methods report them, never guess

Command line: ``layerwise anatomy MODEL_DIR`` (a Hugging Face folder with ``config.json``, built on the meta
device, or a ``.safetensors`` / ``.pt`` file); :func:`from_path` is the loader behind it.

A row (:class:`ParamInfo`)
--------------------------
``name``: the canonical name (wrapper prefixes ``module.``, ``_orig_mod.``, FSDP / checkpoint wrappers
stripped; see :func:`canonical_name`) - the first name ``named_parameters`` gives; ``names``: every canonical
name of that tensor (a tied embedding / LM head appears **once**, with both names); ``role`` (below);
``block`` (index of the repeated block it sits in, else ``None``) and ``stack`` (the name of the container of
those blocks, e.g. ``model.layers``); ``operator`` (below, ``None`` where not recognisable); ``shape`` (as
stored); ``fan_in`` / ``fan_out`` (matrices and embeddings; ``None`` for vectors); ``layout``; ``module`` and
``module_class`` (the module holding the tensor; class ``None`` for state dicts); ``parts`` (for fused
projections with a known split: ``((part, start, stop), ...)`` over the output rows); ``trainable``.

Roles (:data:`ROLES`)
~~~~~~~~~~~~~~~~~~~~~
=====================  ==========================================================================  ===========
role                   what                                                                        vector-like
=====================  ==========================================================================  ===========
``embedding``          token (and token-type) embedding tables; a tied embedding / LM head         one width
                                                                                                   dim
``position_embedding`` learned absolute / relative position tables (GPT-2 ``wpe``, BERT             one width
                       ``position_embeddings``, T5 ``relative_attention_bias``)                    dim
``input``              an input layer outside the blocks: a matrix whose fan_out is the model       one width
                       width and whose fan_in is not (e.g. a classifier's first ``nn.Linear``)     dim
``block_matrix``       a 2-D weight inside a block: attention q/k/v/o (or fused qkv), MLP           no (matrix)
                       gate/up/down, SSM in/out projections, a hand-written model's hidden layers
``matrix``             any other 2-D weight outside the blocks (BERT's head transform, a pooler,    no (matrix)
                       RoBERTa's ``classifier.dense``; every layer of a model without blocks)
``readout``            the output layer: the model's output embedding (``get_output_embeddings()``) one width
                       or a matrix named ``lm_head``/``classifier``/``score``/``head``/``output``/  dim
                       ``decoder``/``out_proj``/... outside the blocks
``norm``               gains of normalisation layers (LayerNorm, RMSNorm, gated RMSNorm, ...)       yes
``bias``               any bias vector (of a Linear, a norm, a conv, BERT's ``cls.predictions.bias``) yes
``ssm_vector``         Mamba / Mamba2 / Falcon-H1 SSM parameters ``A_log``, ``D``, ``dt_bias``       yes
``conv``               convolution kernels (Mamba's depthwise ``conv1d``: vector-like; a full conv  depthwise:
                       is matrix-like, see :attr:`ParamInfo.depthwise`)                             yes
``multiplier``         learnable multipliers (``*.row_multiplier`` ..., :mod:`layerwise.multipliers`) yes
``other``              **unclassified**: nothing above fits (e.g. stacked 3-D MoE expert tensors, a  -
                       custom parameter with an unknown name).  Methods report these and never
                       apply a silent default.
=====================  ==========================================================================  ===========

Decision order (first match wins; block membership decides before module names):

1. a multiplier suffix -> ``multiplier``;
2. a tensor named ``A_log`` / ``A`` / ``D`` / ``dt_bias`` held directly by a module (not a Linear's
   ``weight``/``bias``) -> ``ssm_vector``;
3. a convolution kernel (``nn.Conv1d/2d/3d``; in a state dict: a >= 3-D tensor of a module named ``conv*``)
   -> ``conv``;
4. a 1-D / 0-D ``bias`` -> ``bias``; a gain of a norm module -> ``norm``;
5. an embedding table (``nn.Embedding``; in a state dict: an embedding name) -> ``position_embedding`` when
   named like one, else ``embedding`` - also inside a block;
6. a 2-D tensor **inside a block** -> ``block_matrix`` (whatever its module is called: BERT's
   ``attention.output.dense`` and ``output.dense`` are block matrices, not readouts);
7. a 2-D tensor outside the blocks: the output embedding or a readout name -> ``readout``; fan_out = model
   width != fan_in -> ``input``; else ``matrix``;
8. anything else -> ``other``.

A tied tensor takes the role of its first name (GPT-2's ``wte``/``lm_head`` pair is an ``embedding``).

Blocks
~~~~~~
A block is a child ``<stack>.<i>`` of a container (``nn.ModuleList`` / ``nn.Sequential``; in a state dict, a
name prefix followed by an integer component).  It is decided from parameter names and shapes only, the same
way for a module and its state dict, so ``analyze(model)`` and ``analyze(model.state_dict())`` select the
same matrices.  A child that holds sub-modules (a transformer layer) is a block; a child that is itself a
single layer (``hidden.0.weight``: a ``ModuleList`` of Linears, or a ``Sequential`` MLP) is a block only if
another child of the same container has the same parameter names and shapes (so the input and output layers
of an ``nn.Sequential`` MLP are not blocks, its equal hidden layers are).  The outermost container that
qualifies wins (``layers.0.mlp.experts.3.w1`` is in block 0).

Operators (:data:`OPERATORS`)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
From the module path inside the block: ``q``, ``k``, ``v``, ``o``, ``qkv`` (fused: GPT-2 ``c_attn``,
GPT-NeoX ``query_key_value``, ``qkv_proj``, ``W_pack``, MHA ``in_proj_weight``), ``gate``, ``up``,
``gate_up`` (fused), ``down``, ``router`` (an MoE router: ``router``, ``mlp.gate``, ``block_sparse_moe.gate``),
``ssm_in`` / ``ssm_out`` (Mamba2 / Falcon-H1 ``in_proj`` / ``out_proj``);
outside blocks ``token``, ``token_type``, ``position``; ``None`` where not recognised (the role still holds).
Mamba2 ``in_proj`` rows are split into ``parts`` ``z``, ``x``, ``B``, ``C``, ``dt`` (read from the mixer's
``intermediate_size`` / ``n_groups`` / ``ssm_state_size`` / ``num_heads``); a module with an extra ``d_mlp``
split (older Mamba2 code) has no ``parts``.

Layout, fan-in / fan-out
~~~~~~~~~~~~~~~~~~~~~~~~
``layout="out_in"``: ``nn.Linear`` (weight ``(out, in)``): fan_out = shape[0], fan_in = shape[1].
``layout="in_out"``: Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2; weight ``(in, out)``):
fan_in = shape[0], fan_out = shape[1]; in a state dict, GPT-2's Conv1D names (``c_attn``, ``c_proj``,
``c_fc``, ``q_attn``) are read this way.  ``layout="table"``: embeddings ``(num_embeddings, dim)``:
fan_in = num_embeddings (a one-hot input), fan_out = dim.  ``layout="assumed_out_in"``: a raw 2-D parameter or
a state-dict matrix without a Conv1D name (read as ``(out, in)``; a spectrum does not depend on it).
``layout="conv"``: ``(out_channels, in_channels/groups, *kernel)``: fan_out = out_channels, fan_in =
``in_channels/groups · prod(kernel)``.  A fused projection's fan_out is the sum of its parts.

Width
~~~~~
``Anatomy.width`` is ``config.hidden_size`` (or ``d_model`` / ``n_embd``) when the model has a config, else the
most common dimension among the block matrices (``None`` without blocks); state dicts use the latter.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import types
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
from torch import nn

from layerwise.names import MULTIPLIER_SUFFIXES, canonical_name, is_multiplier

__all__ = [
    "ROLES",
    "VECTOR_ROLES",
    "MATRIX_ROLES",
    "OPERATORS",
    "ParamInfo",
    "BlockInfo",
    "Anatomy",
    "anatomy",
    "from_path",
    "canonical_name",
    "is_multiplier",
    "MULTIPLIER_SUFFIXES",
    "warn_once",
]

ROLES: tuple[str, ...] = (
    "embedding",
    "position_embedding",
    "input",
    "block_matrix",
    "matrix",
    "readout",
    "norm",
    "bias",
    "ssm_vector",
    "conv",
    "multiplier",
    "other",
)
#: roles whose tensors have (at most) one dimension that grows with width and are never decayed by default
VECTOR_ROLES: tuple[str, ...] = ("norm", "bias", "ssm_vector", "multiplier")
#: 2-D roles with both dimensions growing with width
MATRIX_ROLES: tuple[str, ...] = ("block_matrix", "matrix")
OPERATORS: tuple[str, ...] = (
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "gate",
    "up",
    "gate_up",
    "down",
    "router",
    "ssm_in",
    "ssm_out",
    "token",
    "token_type",
    "position",
)

_SSM_VECTORS = frozenset({"A_log", "A", "D", "dt_bias"})
_NORM_NAME = re.compile(r"(?:^|_)(?:[a-z]*norm[a-z0-9_]*|ln(?:_\w+)?|layernorm\w*)$", re.IGNORECASE)
_EMBED_NAME = re.compile(
    r"^(?:embed_tokens|embed_in|wte|wpe|tok_embeddings|word_embeddings|embeddings|embedding|"
    r"token_embedding|position_embeddings|position_embedding|token_type_embeddings|"
    r"embed_positions|pos_embed|pos_emb|relative_attention_bias|shared|embed)$"
)
_POSITION_NAME = re.compile(
    r"^(?:wpe|position_embeddings|position_embedding|embed_positions|pos_embed|pos_emb|"
    r"relative_attention_bias|rel_pos\w*)$"
)
_TOKEN_TYPE_NAME = re.compile(r"^(?:token_type_embeddings|segment_embeddings?)$")
_READOUT_NAME = re.compile(
    r"^(?:lm_head|output|head|score|classifier|decoder|embed_out|fc_out|logits|out_proj|"
    r"output_layer|output_projection|readout|cls_head)$"
)
_CONV1D_NAME = re.compile(r"^(?:c_attn|c_proj|c_fc|q_attn)$")

# operator patterns over the module path *inside the block* (case-insensitive, first match wins)
_OP_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (op, re.compile(p, re.IGNORECASE))
    for op, p in (
        ("ssm_in", r"(?:^|\.)(?:mamba|mixer|ssm)\.in_proj$"),
        ("ssm_out", r"(?:^|\.)(?:mamba|mixer|ssm)\.out_proj$"),
        ("qkv", r"(?:^|\.)(?:qkv_proj|c_attn|query_key_value|qkv|wqkv|w_pack|in_proj_weight)$"),
        ("q", r"(?:^|\.)(?:q_proj|query|wq|q|q_lin|q_attn)$"),
        ("k", r"(?:^|\.)(?:k_proj|key|wk|k|k_lin)$"),
        ("v", r"(?:^|\.)(?:v_proj|value|wv|v|v_lin)$"),
        (
            "o",
            r"(?:^|\.)(?:o_proj|out_lin|o|(?:attn|attention|self_attn|selfattention|encdecattention|mha)\."
            r"(?:out_proj|dense|c_proj|wo|output\.dense))$",
        ),
        ("router", r"(?:^|\.)(?:router|(?:block_sparse_moe|moe|mlp|feed_forward|sparse_moe_block)\.gate)$"),
        ("gate_up", r"(?:^|\.)gate_up_proj$"),
        ("gate", r"(?:^|\.)(?:gate_proj|w1|wi_0)$"),
        ("up", r"(?:^|\.)(?:up_proj|w3|wi_1|wi|c_fc|fc1|fc_in|dense_h_to_4h|intermediate\.dense)$"),
        ("down", r"(?:^|\.)(?:down_proj|w2|wo|fc2|fc_out|dense_4h_to_h|mlp\.c_proj|output\.dense)$"),
    )
)


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process (methods use it to list
    the tensors they skip)."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------- the row
@dataclass(frozen=True)
class ParamInfo:
    """What one tensor is (see the module docstring for every field)."""

    name: str
    names: tuple[str, ...]
    role: str
    block: int | None
    stack: str | None
    operator: str | None
    shape: tuple[int, ...]
    fan_in: int | None
    fan_out: int | None
    layout: str | None
    module: str
    module_class: str | None
    parts: tuple[tuple[str, int, int], ...] | None = None
    trainable: bool = True
    tensor: torch.Tensor | None = field(default=None, repr=False, compare=False, hash=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def depthwise(self) -> bool:
        """A convolution whose every output channel sees one input channel (Mamba's ``conv1d``)."""
        return self.role == "conv" and len(self.shape) >= 2 and self.shape[1] == 1

    @property
    def vector_like(self) -> bool | None:
        """True for norms, biases, SSM vectors, multipliers and depthwise convs; False for matrices, embeddings,
        readouts and full convs; ``None`` for ``other`` (unclassified)."""
        if self.role == "other":
            return None
        if self.role == "conv":
            return self.depthwise
        return self.role in VECTOR_ROLES

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "names": list(self.names),
            "role": self.role,
            "block": self.block,
            "stack": self.stack,
            "operator": self.operator,
            "shape": list(self.shape),
            "fan_in": self.fan_in,
            "fan_out": self.fan_out,
            "layout": self.layout,
            "module": self.module,
            "module_class": self.module_class,
            "parts": [list(p) for p in self.parts] if self.parts else None,
            "trainable": self.trainable,
        }


@dataclass(frozen=True)
class BlockInfo:
    """One repeated block: its module name, stack and index, and the sub-layers found inside it.

    ``attention`` / ``mlp``: the innermost module holding all of the block's attention (q/k/v/o/qkv) / MLP
    (gate/up/down) matrices, ``None`` when there are none or they share no module below the block (BERT's MLP
    is split over ``intermediate`` and ``output``).  ``attention_norm`` / ``mlp_norm``: the pre-norm modules
    (direct children named ``input_layernorm``/``ln_1``/``attention_norm``/``ln_attn``,
    ``post_attention_layernorm``/``ln_2``/``ffn_norm``/``pre_ff_layernorm``/``ln_mlp``), ``None`` if absent.
    """

    name: str
    stack: str
    index: int
    attention: str | None
    mlp: str | None
    attention_norm: str | None
    mlp_norm: str | None


_ATTN_NORMS = ("input_layernorm", "ln_1", "attention_norm", "ln_attn")
_MLP_NORMS = ("post_attention_layernorm", "ln_2", "ffn_norm", "pre_ff_layernorm", "ln_mlp")


def _common_module(names: list[str]) -> str:
    split = [n.split(".") for n in names]
    out = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out)


# ------------------------------------------------------------------------------------------ the table
_MD_COLUMNS = ("name", "shape", "role", "block", "operator", "fan_in", "fan_out", "layout", "tied")


class Anatomy(Sequence[ParamInfo]):
    """The rows of :func:`anatomy`, in parameter order, with look-ups and printers."""

    def __init__(
        self, rows: list[ParamInfo], *, width: int | None, source: str, modules: Mapping[str, nn.Module] | None = None
    ) -> None:
        self.rows = rows
        self.width = width
        self.source = source
        self._modules = dict(modules or {})
        self._by_name = {n: r for r in rows for n in r.names}
        self._by_id = {id(r.tensor): r for r in rows if r.tensor is not None}

    # sequence protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> ParamInfo: ...
    @overload
    def __getitem__(self, i: slice) -> list[ParamInfo]: ...
    def __getitem__(self, i: int | slice) -> ParamInfo | list[ParamInfo]:
        return self.rows[i]

    def __iter__(self) -> Iterator[ParamInfo]:
        return iter(self.rows)

    # look-ups ---------------------------------------------------------------------------------------
    def by_name(self, name: str) -> ParamInfo:
        """The row holding ``name`` (canonicalised; any of a tied tensor's names); ``KeyError`` otherwise."""
        try:
            return self._by_name[canonical_name(name)]
        except KeyError:
            raise KeyError(f"no parameter named {name!r} in this anatomy ({len(self.rows)} tensors)") from None

    def get(self, name: str) -> ParamInfo | None:
        return self._by_name.get(canonical_name(name))

    def of(self, tensor: torch.Tensor) -> ParamInfo:
        """The row of a tensor of the analysed module (by identity); ``KeyError`` otherwise."""
        try:
            return self._by_id[id(tensor)]
        except KeyError:
            raise KeyError(f"tensor of shape {tuple(tensor.shape)} is not a parameter of the analysed model") from None

    def module(self, name: str) -> nn.Module:
        """The sub-module of the analysed model with canonical name ``name`` (``""`` is the model itself; works
        through DDP / ``torch.compile`` / FSDP1 wrappers).  ``KeyError`` for state dicts or unknown names."""
        try:
            return self._modules[canonical_name(name)]
        except KeyError:
            raise KeyError(f"no module named {name!r} in this anatomy (source {self.source!r})") from None

    def where(
        self,
        role: str | Iterable[str] | None = None,
        *,
        operator: str | Iterable[str] | None = None,
        block: int | None = None,
        trainable: bool | None = None,
    ) -> list[ParamInfo]:
        """Rows filtered by role(s), operator(s), block index and trainability."""
        roles = None if role is None else ({role} if isinstance(role, str) else set(role))
        if roles is not None:
            unknown = roles - set(ROLES)
            if unknown:
                raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {ROLES}")
        ops = None if operator is None else ({operator} if isinstance(operator, str) else set(operator))
        return [
            r
            for r in self.rows
            if (roles is None or r.role in roles)
            and (ops is None or r.operator in ops)
            and (block is None or r.block == block)
            and (trainable is None or r.trainable == trainable)
        ]

    def block_matrices(self, *, trainable: bool | None = None) -> list[ParamInfo]:
        """The ``block_matrix`` rows; on a model without blocks, its ``matrix`` and ``input`` rows (every
        2-D layer that is neither an embedding nor a readout)."""
        rows = self.where("block_matrix", trainable=trainable)
        if not rows and not any(r.block is not None for r in self.rows):
            rows = self.where(("matrix", "input"), trainable=trainable)
        return rows

    def blocks(self) -> list[BlockInfo]:
        """The repeated blocks, in order of first appearance, with their attention / MLP sub-layers."""
        by_block: dict[tuple[str, int], list[ParamInfo]] = {}
        for r in self.rows:
            if r.block is not None and r.stack is not None:
                by_block.setdefault((r.stack, r.block), []).append(r)
        out = []
        for (stack, idx), rows in by_block.items():
            bname = f"{stack}.{idx}"
            subs = {}
            for kind, ops in (("attention", ("q", "k", "v", "o", "qkv")), ("mlp", ("gate", "up", "gate_up", "down"))):
                mods = [r.module for r in rows if r.role == "block_matrix" and r.operator in ops]
                common = _common_module(mods) if mods else ""
                subs[kind] = common if len(common) > len(bname) else None
            norms = {
                r.module.rsplit(".", 1)[-1]: r.module
                for r in rows
                if r.role == "norm" and r.module.rsplit(".", 1)[0] == bname
            }
            attn_norm = next((norms[n] for n in _ATTN_NORMS if n in norms), None)
            mlp_norm = next((norms[n] for n in _MLP_NORMS if n in norms), None)
            out.append(BlockInfo(bname, stack, idx, subs["attention"], subs["mlp"], attn_norm, mlp_norm))
        return out

    def unclassified(self) -> list[ParamInfo]:
        """Rows with role ``other``."""
        return self.where("other")

    def summary(self) -> dict[str, int]:
        """Counts: ``block_matrices``, ``vector_like``, ``unclassified``, ``tensors`` and one per role."""
        out = {
            "tensors": len(self.rows),
            "block_matrices": len(self.block_matrices()),
            "vector_like": sum(1 for r in self.rows if r.vector_like),
            "unclassified": len(self.unclassified()),
        }
        for role in ROLES:
            out[role] = sum(1 for r in self.rows if r.role == role)
        return out

    # printers ---------------------------------------------------------------------------------------
    def to_markdown(self, columns: Sequence[str] | None = None) -> str:
        """A Markdown table, one row per tensor (columns: name, shape, role, block, operator, fan_in, fan_out,
        layout, tied (the other names)), then a line of counts."""
        cols = list(columns) if columns is not None else list(_MD_COLUMNS)

        def cell(r: ParamInfo, c: str) -> str:
            if c == "tied":
                return ", ".join(r.names[1:])
            if c == "shape":
                return "x".join(str(s) for s in r.shape) if r.shape else "scalar"
            if c == "parts" and r.parts:
                return ", ".join(f"{p}[{a}:{b}]" for p, a, b in r.parts)
            v = getattr(r, c)
            return "" if v is None else str(v)

        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in self.rows]
        s = self.summary()
        lines.append(
            f"\n{s['tensors']} tensors: {s['block_matrices']} block matrices, {s['vector_like']} "
            f"vector-like, {s['unclassified']} unclassified; width {self.width}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"Anatomy({s['tensors']} tensors, {s['block_matrices']} block matrices, {s['unclassified']} "
            f"unclassified, width={self.width}, source={self.source!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "source": self.source,
            "summary": self.summary(),
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ------------------------------------------------------------------------------------------ building
@dataclass
class _Entry:
    names: list[str]
    tensor: torch.Tensor
    owner: nn.Module | None
    trainable: bool


def _class_names(mod: nn.Module | None) -> tuple[str, ...]:
    return tuple(c.__name__ for c in type(mod).__mro__) if mod is not None else ()


def _module_kind(mod: nn.Module | None) -> str | None:
    """What the owning module is: linear / conv1d_hf / embedding / norm / conv / None (unknown / custom)."""
    if mod is None:
        return None
    if getattr(mod, "_layerwise_conv1d", False):
        return "conv1d_hf"
    if isinstance(mod, nn.Linear) or getattr(mod, "_layerwise_linear", False):
        return "linear"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    names = _class_names(mod)
    if "Conv1D" in names and hasattr(mod, "nf"):  # transformers.pytorch_utils.Conv1D: weight (in, out)
        return "conv1d_hf"
    if isinstance(mod, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)) or any(
        "Norm" in n for n in names[:1]
    ):
        return "norm"
    return None


def _name_kind(name: str, shape: tuple[int, ...]) -> str | None:
    """The state-dict analogue of :func:`_module_kind`, from the owning module's last name component."""
    parts = name.split(".")
    mod = parts[-2] if len(parts) >= 2 else ""
    if _NORM_NAME.search(mod) and len(shape) <= 1:
        return "norm"
    if _EMBED_NAME.match(mod) and len(shape) == 2:
        return "embedding"
    if len(shape) >= 3 and "conv" in mod.lower():
        return "conv"
    if _CONV1D_NAME.match(mod) and len(shape) == 2:
        return "conv1d_hf"
    return None


def _find_blocks(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, int]]:
    """``name -> (stack, index)`` for every name inside a block (see "Blocks" in the module docstring)."""
    children: dict[str, dict[int, list[tuple[tuple[str, ...], tuple[int, ...]]]]] = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            if parts[i].isdigit():
                children.setdefault(".".join(parts[:i]), {}).setdefault(int(parts[i]), []).append(
                    (tuple(parts[i + 1 :]), shape)
                )
    block_sets: dict[str, set[int]] = {}
    for stack, kids in children.items():
        sigs = {idx: tuple(sorted((".".join(rest), sh) for rest, sh in items)) for idx, items in kids.items()}
        counts = Counter(sigs.values())
        members = set()
        for idx, items in kids.items():
            nested = any(len(rest) > 1 for rest, _ in items)
            if nested or counts[sigs[idx]] >= 2:
                members.add(idx)
        if members:
            block_sets[stack] = members
    out: dict[str, tuple[str, int]] = {}
    for name in shapes:
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            if parts[i].isdigit():
                stack = ".".join(parts[:i])
                if int(parts[i]) in block_sets.get(stack, ()):
                    out[name] = (stack, int(parts[i]))
                    break
    return out


def _operator(rel_module: str) -> str | None:
    for op, pat in _OP_PATTERNS:
        if pat.search(rel_module):
            return op
    return None


def _fans(kind: str | None, shape: tuple[int, ...]) -> tuple[int | None, int | None, str | None]:
    if len(shape) == 2:
        if kind == "conv1d_hf":
            return shape[0], shape[1], "in_out"
        if kind == "embedding":
            return shape[0], shape[1], "table"
        if kind == "linear":
            return shape[1], shape[0], "out_in"
        return shape[1], shape[0], "assumed_out_in"
    if len(shape) >= 3 and kind == "conv":
        return int(math.prod(shape[1:])), shape[0], "conv"
    return None, None, None


def _mamba_parts(mod: nn.Module | None, fan_out: int) -> tuple[tuple[str, int, int], ...] | None:
    """z, x, B, C, dt row ranges of a Mamba2 / Falcon-H1 mixer's ``in_proj`` (None if not readable)."""
    if mod is None:
        return None
    try:
        keys = ("intermediate_size", "n_groups", "ssm_state_size", "num_heads")
        inter, groups, state, heads = (int(getattr(mod, k)) for k in keys)
        gn = groups * state
    except (AttributeError, TypeError, ValueError):
        return None
    sizes = (("z", inter), ("x", inter), ("B", gn), ("C", gn), ("dt", heads))
    if sum(s for _, s in sizes) != fan_out:
        return None
    out, start = [], 0
    for part, size in sizes:
        out.append((part, start, start + size))
        start += size
    return tuple(out)


def _config_width(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        v = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _entries_from_module(model: nn.Module) -> list[_Entry]:
    owners: dict[int, tuple[nn.Module, str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), (mod, f"{mname}.{pname}" if mname else pname))
    entries: dict[int, _Entry] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        name = canonical_name(raw)
        e = entries.get(id(p))
        if e is None:
            owner = owners.get(id(p), (None, raw))[0]
            entries[id(p)] = _Entry([name], p, owner, bool(p.requires_grad))
        elif name not in e.names:
            e.names.append(name)
    return list(entries.values())


def _tie_key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta" or t.numel() == 0 or type(t) not in (torch.Tensor, nn.Parameter):
        return ("id", id(t))  # meta / empty / DTensor shards: only the same object is tied
    try:
        return (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            str(t.device),
        )
    except (RuntimeError, NotImplementedError):
        return ("id", id(t))


def _entries_from_state_dict(sd: Mapping[str, Any]) -> list[_Entry]:
    entries: dict[tuple, _Entry] = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        name = canonical_name(str(k))
        key = _tie_key(t)
        e = entries.get(key)
        if e is None:
            entries[key] = _Entry([name], t, None, True)
        elif name not in e.names:
            e.names.append(name)
    return list(entries.values())


def anatomy(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> Anatomy:
    """What every parameter of a module (or every tensor of a state dict) is: one :class:`ParamInfo` each.

    Modules: every parameter (trainable or not; ``trainable`` says which), tied parameters once.  State dicts:
    every tensor (tensors sharing storage are tied).  See the module docstring for the roles and rules.
    """
    if isinstance(model_or_state_dict, nn.Module):
        entries = _entries_from_module(model_or_state_dict)
        source = "module"
        model: nn.Module | None = model_or_state_dict
    elif isinstance(model_or_state_dict, Mapping):
        entries = _entries_from_state_dict(model_or_state_dict)
        source = "state_dict"
        model = None
    else:
        raise TypeError(
            f"anatomy: expected an nn.Module or a state dict (Mapping[str, Tensor]), got "
            f"{type(model_or_state_dict).__name__}"
        )
    modules: dict[str, nn.Module] = {}
    if model is not None:
        for n, m in model.named_modules():
            modules.setdefault(canonical_name(n), m)
    shapes = {n: tuple(e.tensor.shape) for e in entries for n in e.names}
    blocks = _find_blocks(shapes)

    readout_ids: set[int] = set()
    if model is not None:
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out_mod = get_out()
            except Exception:  # noqa: BLE001 - a model's own accessor failing means: no known readout
                out_mod = None
            w = getattr(out_mod, "weight", None) if isinstance(out_mod, nn.Module) else None
            if isinstance(w, torch.Tensor):
                readout_ids.add(id(w))

    # pass 1: everything except the width-dependent input/matrix split
    pre: list[dict[str, Any]] = []
    for e in entries:
        name = e.names[0]
        shape = tuple(int(s) for s in e.tensor.shape)
        parts = name.split(".")
        leaf = parts[-1]
        module = ".".join(parts[:-1])
        mod_last = parts[-2] if len(parts) >= 2 else ""
        kind = _module_kind(e.owner) if model is not None else _name_kind(name, shape)
        if model is not None and kind is None:
            # custom modules: fall back to the state-dict name rules for norms / embeddings
            nk = _name_kind(name, shape)
            kind = nk if nk in ("norm", "embedding", "conv") else None
        blk = blocks.get(name)
        stack, bidx = blk if blk is not None else (None, None)
        rel = ".".join(parts[len(stack.split(".")) + 1 : -1]) if stack is not None else module
        operator = None
        fan_in, fan_out, layout = _fans(kind, shape)
        prts = None
        if leaf in MULTIPLIER_SUFFIXES:
            role = "multiplier"
            operator = _operator(rel) if stack is not None else None
            fan_in = fan_out = layout = None
        elif leaf in _SSM_VECTORS and kind not in ("linear", "conv1d_hf", "embedding", "conv"):
            role = "ssm_vector"
            fan_in = fan_out = layout = None
        elif kind == "conv" and len(shape) >= 3:
            role = "conv"
        elif len(shape) <= 1:
            fan_in = fan_out = layout = None
            if leaf == "bias" or leaf.endswith("_bias"):
                role = "bias"
            elif kind == "norm" or _NORM_NAME.search(mod_last):
                role = "norm"
            else:
                role = "other"
        elif kind == "embedding" or (len(shape) == 2 and _EMBED_NAME.match(mod_last) and kind is None):
            fan_in, fan_out, layout = _fans("embedding", shape)
            if _POSITION_NAME.match(mod_last):
                role, operator = "position_embedding", "position"
            else:
                role = "embedding"
                operator = "token_type" if _TOKEN_TYPE_NAME.match(mod_last) else "token"
        elif len(shape) == 2 and stack is not None:
            role = "block_matrix"
            operator = _operator(rel if leaf == "weight" else (f"{rel}.{leaf}" if rel else leaf))
            if operator == "ssm_in" and fan_out is not None:
                prts = _mamba_parts(modules.get(module.rsplit(".", 1)[0] if "." in module else ""), fan_out)
        elif len(shape) == 2:
            if id(e.tensor) in readout_ids or _READOUT_NAME.match(mod_last):
                role = "readout"
            else:
                role = "matrix?"  # decided below, once the width is known
        else:
            role = "other"
        pre.append(
            dict(
                name=name,
                names=tuple(e.names),
                role=role,
                block=bidx,
                stack=stack,
                operator=operator,
                shape=shape,
                fan_in=fan_in,
                fan_out=fan_out,
                layout=layout,
                module=module,
                module_class=type(e.owner).__name__ if e.owner is not None else None,
                parts=prts,
                trainable=e.trainable,
                tensor=e.tensor,
            )
        )

    width = _config_width(model) if model is not None else None
    if width is None:
        dims = Counter(d for r in pre if r["role"] == "block_matrix" for d in r["shape"])
        width = dims.most_common(1)[0][0] if dims else None
    rows = []
    for r in pre:
        if r["role"] == "matrix?":
            r["role"] = "input" if (width is not None and r["fan_out"] == width and r["fan_in"] != width) else "matrix"
        rows.append(ParamInfo(**r))
    return Anatomy(rows, width=width, source=source, modules=modules)


# ------------------------------------------------------------------------------------------- loading
def from_path(path: str | os.PathLike[str]) -> tuple[nn.Module | dict[str, torch.Tensor], str]:
    """What ``layerwise anatomy PATH`` analyses: ``(model or state dict, description)``.

    * a folder with ``config.json``: the Hugging Face model of ``config.architectures[0]`` (else
      ``AutoModelForCausalLM``, else ``AutoModel``) built from the config on the meta device (no weights read);
    * a ``.safetensors`` file or a folder of them: meta tensors of the stored shapes (headers only);
    * a ``.pt`` / ``.pth`` / ``.bin`` file: ``torch.load(weights_only=True)``; a dict holding ``"model"`` or
      ``"state_dict"`` uses that entry.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the path when it is none of these.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"anatomy: {p} does not exist")
    if os.path.isdir(p):
        cfg_path = os.path.join(p, "config.json")
        if os.path.exists(cfg_path):
            return _meta_model(p, cfg_path), f"{p} (built from config.json on the meta device)"
        files = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
        if files:
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                sd.update(_safetensors_meta(os.path.join(p, f)))
            return sd, f"{p} ({len(files)} safetensors file(s), shapes only)"
        raise ValueError(f"anatomy: folder {p} has no config.json and no .safetensors file")
    if p.endswith(".safetensors"):
        return _safetensors_meta(p), f"{p} (shapes only)"
    if p.endswith((".pt", ".pth", ".bin", ".ckpt")):
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping):
            for key in ("model", "state_dict", "model_state_dict"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
        if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"anatomy: {p} holds no state dict (expected {{name: tensor}}, or one under 'model')")
        return dict(obj), p
    raise ValueError(f"anatomy: {p} is not a model folder (config.json), .safetensors, or .pt/.pth/.bin file")


def _safetensors_meta(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file as a ``device="meta"`` tensor (shape and dtype from the header)."""
    from layerwise._safetensors import read_header

    try:
        return read_header(path)[0]
    except ValueError as exc:
        raise ValueError(f"anatomy: {exc}") from None


def _meta_model(folder: str, cfg_path: str) -> nn.Module:
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is an optional extra
        raise ValueError(
            f"anatomy: reading {folder} needs the transformers package (pip install transformers)"
        ) from None
    with open(cfg_path, encoding="utf-8") as fh:
        raw = json.load(fh)
    config = transformers.AutoConfig.from_pretrained(folder)
    classes = []
    for arch in raw.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            classes.append(cls.from_config if hasattr(cls, "from_config") else cls._from_config)
    classes += [transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    last: Exception | None = None
    for build in classes:
        try:
            with torch.device("meta"):
                return build(config)
        except (ValueError, TypeError, AttributeError, KeyError, ImportError, RuntimeError, NotImplementedError) as exc:
            last = exc
    raise ValueError(f"anatomy: cannot build a model from {cfg_path}: {last}")


class _CallableModule(types.ModuleType):
    """``layerwise.anatomy`` is both this module and the function: ``lw.anatomy(model)`` calls :func:`anatomy`."""

    def __call__(self, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> Anatomy:
        return anatomy(model_or_state_dict)


sys.modules[__name__].__class__ = _CallableModule
