"""Canonical parameter names and the module vocabulary shared by every part of layerwise.

Per-module metadata in layerwise is keyed by *canonical* parameter name, never stored on
``Parameter`` objects (attributes vanish under ``fully_shard``).  A canonical name is the name
``model.named_parameters()`` gives on the bare model: wrapper prefixes added by DDP (``module.``),
``torch.compile`` (``_orig_mod.``), FSDP1 / activation checkpointing (``_fsdp_wrapped_module.``,
``_checkpoint_wrapped_module.``) are stripped.

Module types follow Hugging Face LLaMA names (``q_proj`` ... ``down_proj``, ``embed_tokens``,
``lm_head``) and a few common aliases (GPT-2 ``c_attn``/``c_fc``, ``wte``), so the same rules
work on our reference model and on HF models.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

_WRAPPER_PARTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

#: parameter-name suffixes of learnable multipliers (see :mod:`layerwise.multipliers`)
MULTIPLIER_SUFFIXES = ("row_multiplier", "col_multiplier", "scalar_multiplier")

_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

_TYPE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("q", re.compile(r"(?:^|\.)(?:q_proj|query|wq)(?:\.|$)")),
    ("k", re.compile(r"(?:^|\.)(?:k_proj|key|wk)(?:\.|$)")),
    ("v", re.compile(r"(?:^|\.)(?:v_proj|value|wv)(?:\.|$)")),
    ("o", re.compile(r"(?:^|\.)(?:o_proj|out_proj|wo|attn\.c_proj)(?:\.|$)")),
    ("gate", re.compile(r"(?:^|\.)(?:gate_proj|w1)(?:\.|$)")),
    ("up", re.compile(r"(?:^|\.)(?:up_proj|w3|c_fc|fc1)(?:\.|$)")),
    ("down", re.compile(r"(?:^|\.)(?:down_proj|w2|fc2|mlp\.c_proj)(?:\.|$)")),
    ("embed", re.compile(r"(?:^|\.)(?:embed_tokens|wte|tok_embeddings|word_embeddings)(?:\.|$)")),
    ("head", re.compile(r"(?:^|\.)(?:lm_head|output|head)(?:\.|$)")),
    ("norm", re.compile(r"(?:^|\.)(?:[a-z_]*norm[a-z_0-9]*|ln_\w+|ln)(?:\.|$)")),
)

ATTENTION_TYPES = ("q", "k", "v", "o")
MLP_TYPES = ("gate", "up", "down")
BLOCK_MATRIX_TYPES = ATTENTION_TYPES + MLP_TYPES


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``, FSDP/checkpoint wrappers) from a name."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    return ".".join(parts)


def named_parameters(model: nn.Module, *, trainable_only: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` with canonical names (and, by default, only trainable ones)."""
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        yield canonical_name(name), p


def layer_index(name: str) -> int | None:
    """Index of the transformer block a name belongs to (``layers.3.mlp...`` -> 3), else ``None``."""
    m = _BLOCK_RE.search(canonical_name(name))
    return int(m.group(1)) if m else None


def is_multiplier(name: str) -> bool:
    return canonical_name(name).rsplit(".", 1)[-1] in MULTIPLIER_SUFFIXES


def module_type(name: str) -> str:
    """One of q/k/v/o/gate/up/down/embed/head/norm/multiplier/other for a parameter or module name."""
    cname = canonical_name(name)
    if is_multiplier(cname):
        return "multiplier"
    for kind, pat in _TYPE_PATTERNS:
        if pat.search(cname):
            return kind
    return "other"


def block_linear_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Weights of the ``nn.Linear`` modules inside transformer blocks, by canonical name.

    On a model without recognisable blocks, every Linear weight.  Linear-like modules that keep a
    ``weight`` attribute (e.g. wrapped by :mod:`layerwise.multipliers`) count as Linear.
    """
    out: list[tuple[str, torch.Tensor]] = []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or getattr(mod, "_layerwise_linear", False):
            out.append((canonical_name(f"{mname}.weight" if mname else "weight"), mod.weight))
    in_blocks = [(n, w) for n, w in out if layer_index(n) is not None]
    return in_blocks if in_blocks else out
