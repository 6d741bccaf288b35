"""Lazy access to the weights of a checkpoint file or model folder: metadata first, tensors a batch at a time.

``layerwise analyze`` must read checkpoints larger than the machine's memory, so it never holds a whole
state dict.  A :class:`WeightSource` knows every tensor's name, shape and dtype without reading data
(``meta()`` returns them as ``device="meta"`` tensors, on which the usual selection runs), and ``read(keys)``
yields only the requested tensors, opening the files for that call alone:

* ``.safetensors`` (one file, ``model-*.safetensors`` shards, or ``model.safetensors.index.json``):
  ``safetensors.safe_open``; the header gives shapes and dtypes, ``get_tensor`` reads one tensor.
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` (one file, ``pytorch_model-*.bin`` shards, or
  ``pytorch_model.bin.index.json``): ``torch.load(mmap=True, weights_only=True)``, so opening a file reads
  only its pickle; the requested tensors are copied out of the mapping and the mapping is dropped.  A file
  in the legacy (non-zip) format cannot be mapped: it is read whole once, with a warning.

Files are closed (unmapped) after every ``read``: pages of a memory map count toward the process's
resident set for as long as the map is open, so keeping it open would make peak memory grow with the
checkpoint instead of with one batch.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "WeightSource",
    "SafetensorsSource",
    "TorchFileSource",
    "InMemorySource",
    "SourceError",
    "from_checkpoint_obj",
]


class SourceError(RuntimeError):
    """A file or folder that cannot be read as weights (the message names it)."""


def from_checkpoint_obj(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object: its ``model`` / ``state_dict`` /
    ``model_state_dict`` entry, or the object itself when it maps names to tensors."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise SourceError(
        f"{path}: no state dict found (expected a dict with a 'model' key or a dict of tensors, "
        f"got {type(obj).__name__})"
    )


class WeightSource:
    """Names, shapes and dtypes of the tensors at a path, and their data on request (see the module doc)."""

    def __init__(self, path: Path, files: dict[str, Path], meta: dict[str, torch.Tensor]):
        self.path = Path(path)
        self._files = files  # key -> file holding it
        self._meta = meta  # key -> meta tensor (shape, dtype)

    def __len__(self) -> int:
        return len(self._meta)

    def keys(self) -> list[str]:
        return list(self._meta)

    def meta(self) -> dict[str, torch.Tensor]:
        """``{key: tensor on device "meta"}`` with each tensor's shape and dtype (no data)."""
        return dict(self._meta)

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, CPU tensor)`` for ``keys``, grouped by file; each file is opened for this call only."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self._files:
                raise KeyError(f"{self.path}: no tensor named {k!r}")
            by_file.setdefault(self._files[k], []).append(k)
        for f, ks in by_file.items():
            yield from self._read_file(f, ks)

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in memory at once (small checkpoints; :func:`load_state_dict`'s behaviour)."""
        return dict(self.read(self.keys()))

    def _read_file(self, f: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError


def _meta_like(t: Any) -> torch.Tensor:
    return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")


class SafetensorsSource(WeightSource):
    """One or more ``.safetensors`` files (a file, a folder's shards, or an ``index.json`` weight map)."""

    _DTYPES = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
        "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
    }

    @classmethod
    def open(cls, path: Path, files: list[Path]) -> SafetensorsSource:
        safe_open = _safe_open()
        where: dict[str, Path] = {}
        meta: dict[str, torch.Tensor] = {}
        for f in files:
            if not f.is_file():
                raise SourceError(f"{path}: shard {f.name} is listed but missing")
            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for k in fh.keys():
                        sl = fh.get_slice(k)
                        dtype = cls._DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise SourceError(f"{f}: tensor {k!r} has unsupported safetensors dtype {sl.get_dtype()}")
                        if k in where:
                            raise SourceError(f"{path}: tensor {k!r} is in both {where[k].name} and {f.name}")
                        where[k] = f
                        meta[k] = torch.empty(tuple(sl.get_shape()), dtype=dtype, device="meta")
            except SourceError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised with the file name
                raise SourceError(f"{f}: cannot read as safetensors: {exc}") from exc
        return cls(path, where, meta)

    def _read_file(self, f: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        safe_open = _safe_open()
        try:
            fh_ctx = safe_open(str(f), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{f}: cannot read as safetensors: {exc}") from exc
        with fh_ctx as fh:
            for k in keys:
                yield k, fh.get_tensor(k)


def _safe_open() -> Callable:
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise SourceError("reading .safetensors needs the 'safetensors' package") from exc
    return safe_open


class TorchFileSource(WeightSource):
    """One or more ``torch.save`` files, read with ``torch.load(mmap=True, weights_only=True)``."""

    @classmethod
    def open(cls, path: Path, files: list[Path]) -> WeightSource:
        where: dict[str, Path] = {}
        meta: dict[str, torch.Tensor] = {}
        for f in files:
            if not f.is_file():
                raise SourceError(f"{path}: shard {f.name} is listed but missing")
            if not zipfile.is_zipfile(f):  # legacy format (or not a checkpoint): cannot be mapped
                if len(files) > 1:
                    raise SourceError(
                        f"{f}: legacy (non-zip) torch file in a sharded checkpoint: re-save it "
                        f"with torch.save to analyse it lazily"
                    )
                sd = dict(from_checkpoint_obj(_torch_load(f, mmap=False), f))
                warnings.warn(
                    f"{f}: legacy (non-zip) torch file, cannot be memory-mapped: read whole "
                    f"(re-save it with torch.save to analyse it lazily)",
                    stacklevel=2,
                )
                return InMemorySource(path, sd)
            obj = _torch_load(f, mmap=True)
            sd = from_checkpoint_obj(obj, f)
            for k, v in sd.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if k in where:
                    raise SourceError(f"{path}: tensor {k!r} is in both {where[k].name} and {f.name}")
                where[k] = f
                meta[k] = _meta_like(v)
            del obj, sd
        return cls(path, where, meta)

    def _read_file(self, f: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        obj = _torch_load(f, mmap=True)
        sd = from_checkpoint_obj(obj, f)
        # copies: the returned tensors must not keep the file mapped once this batch is done
        out = [(k, sd[k].clone()) for k in keys]
        del obj, sd
        yield from out


def _torch_load(f: Path, *, mmap: bool) -> Any:
    """``torch.load(f, weights_only=True, map_location="cpu", mmap=mmap)``; ``SourceError`` naming the file
    for anything unreadable."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise SourceError(f"{f}: cannot read as a torch checkpoint (weights_only=True): {exc}") from exc


class InMemorySource(WeightSource):
    """A state dict already in memory (a DCP folder read in one process, a legacy torch file)."""

    def __init__(self, path: Path, sd: Mapping[str, torch.Tensor]):
        tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        super().__init__(path, {k: Path(path) for k in tensors}, {k: _meta_like(v) for k, v in tensors.items()})
        self._sd = tensors

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            if k not in self._sd:
                raise KeyError(f"{self.path}: no tensor named {k!r}")
            yield k, self._sd[k]


def index_files(index: Path) -> list[Path]:
    """The shard files named by a Hugging Face ``*.index.json`` (its ``weight_map``), in first-use order."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        wm = data["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{index}: not a valid shard index ({exc})") from exc
    names = list(dict.fromkeys(wm.values()))
    for n in names:
        if Path(n).name != n:
            raise SourceError(f"{index}: shard {n!r} is not a plain file name in the same folder")
    return [index.parent / n for n in names]
