"""Canonical parameter names.

Per-module metadata in layerwise is keyed by *canonical* parameter name, never stored on ``Parameter``
objects (attributes vanish under ``fully_shard``).  A canonical name is the name ``model.named_parameters()``
gives on the bare model: wrapper prefixes added by DDP (``module.``), ``torch.compile`` (``_orig_mod.``),
FSDP1 / activation checkpointing (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``) are stripped.

This module only names things.  What a parameter *is* (its role, block, operator, fan-in/out) is decided in
one place, :mod:`layerwise.anatomy`.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["MULTIPLIER_SUFFIXES", "canonical_name", "is_multiplier", "named_parameters"]

_WRAPPER_PARTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

#: parameter-name suffixes of learnable multipliers (see :mod:`layerwise.multipliers`)
MULTIPLIER_SUFFIXES = ("row_multiplier", "col_multiplier", "scalar_multiplier")


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``, FSDP/checkpoint wrappers) from a name."""
    return ".".join(p for p in str(name).split(".") if p not in _WRAPPER_PARTS)


def named_parameters(model: nn.Module, *, trainable_only: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` with canonical names (and, by default, only trainable ones)."""
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        yield canonical_name(name), p


def is_multiplier(name: str) -> bool:
    """Whether a (raw or canonical) parameter name is a learnable multiplier's."""
    return canonical_name(name).rsplit(".", 1)[-1] in MULTIPLIER_SUFFIXES
