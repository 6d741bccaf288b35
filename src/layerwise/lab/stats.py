"""Small statistics and JSON helpers shared by ``compare``, ``sweep`` and ``report``.

A standard error needs at least two values: over one seed it is *not available* (NaN here, "n/a" in tables,
``null`` in JSON), never 0.  JSON has no NaN or infinity: :func:`json_safe` writes them as ``null``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from layerwise._json import json_safe

__all__ = ["mean_se", "sem", "fmt_pm", "json_safe", "dump_json"]


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample s.d. / √n).  The s.e. is NaN for fewer than two values or
    when a value is not finite (a diverged run); the mean is NaN for no values."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = math.fsum(xs) / n
    if n < 2 or not all(math.isfinite(x) for x in xs):
        return m, float("nan")
    var = math.fsum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def sem(xs: list[float]) -> float:
    """The standard error of :func:`mean_se` alone."""
    return mean_se(xs)[1]


def fmt_pm(mean: float, se: float, digits: int = 4, signed: bool = False) -> str:
    """``"5.2078 ± 0.0219"``; ``"5.2078 ± n/a"`` when the s.e. is not available; ``"n/a"`` without a mean."""
    if mean is None or not math.isfinite(mean):
        return "n/a" if mean is None or math.isnan(mean) else f"{mean}"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{m} ± {se:.{digits}f}" if se is not None and math.isfinite(se) else f"{m} ± n/a"


def dump_json(path: str | Path, obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as strict JSON (NaN/inf -> null; unknown objects -> null), atomically."""
    path = Path(path)
    text = json.dumps(json_safe(obj), indent=indent, default=lambda o: None, allow_nan=False)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
