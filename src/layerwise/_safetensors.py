"""The header of a ``.safetensors`` file, read and checked with the standard library.

The format: an 8-byte little-endian length ``n``, then ``n`` bytes of JSON mapping every tensor's name to its
``dtype``, ``shape`` and ``data_offsets`` (``[begin, end)``, relative to the end of the header), plus an
optional ``"__metadata__"`` entry; the data follow.  :func:`read_header` returns every tensor as a
``device="meta"`` tensor (shape and dtype, no data) and the absolute byte offset of its data, after checking
each entry (dtype known, byte range inside the file and matching the shape), so callers can read one tensor
with a plain file read.  Errors are ``ValueError`` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

__all__ = ["DTYPES", "MAX_HEADER", "read_header"]

#: safetensors dtype names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
}
#: the format's own limit on the JSON header (bytes)
MAX_HEADER = 100_000_000


def _count(x: object) -> bool:
    """Whether a JSON value is a dimension or byte offset: an int >= 0 (``true`` is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``({name: meta tensor}, {name: absolute byte offset of its data})`` of the file at ``path``."""
    f = os.fspath(path)
    try:
        size = os.path.getsize(f)
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{f}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"{f}: not a safetensors file (header length {n} for a {size}-byte file)")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as exc:
        raise ValueError(f"{f}: cannot read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{f}: cannot read as safetensors (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{f}: cannot read as safetensors (header is not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    meta: dict[str, torch.Tensor] = {}
    offsets: dict[str, int] = {}
    for k, entry in header.items():
        if k == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = isinstance(dtype_name, str) and isinstance(shape, list) and all(_count(d) for d in shape)
            ok = ok and _count(begin) and _count(end) and begin <= end <= data_size
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{f}: tensor {k!r} has a malformed header entry {entry!r}")
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"{f}: tensor {k!r} has unsupported safetensors dtype {dtype_name}")
        try:
            t = torch.empty(tuple(shape), dtype=dtype, device="meta")
        except (TypeError, RuntimeError, ValueError):  # dimensions or sizes past int64
            raise ValueError(f"{f}: tensor {k!r} has a malformed header entry {entry!r}") from None
        if end - begin != math.prod(shape) * t.element_size():
            raise ValueError(f"{f}: tensor {k!r}: {end - begin} bytes stored for shape {tuple(shape)} of {dtype_name}")
        meta[k], offsets[k] = t, data_start + begin
    return meta, offsets
