"""Values ready for strict JSON: JSON has no NaN or infinity, and no tensors.

:func:`json_safe` is the one conversion used wherever the library or the harness writes JSON (spectral reports,
``metrics.jsonl``, result tables): tensors become numbers (one element) or nested lists, non-finite floats
become ``null``, recursively through dicts, lists and tuples.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["json_safe"]


def json_safe(obj: Any) -> Any:
    """``obj`` with tensors as Python numbers / lists and every non-finite float as None (recursively)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
