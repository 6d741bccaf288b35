"""Lazy access to the weights of a checkpoint file or model folder: metadata first, tensors a batch at a time.

``layerwise analyze`` must read checkpoints larger than the machine's memory, so it never holds a whole
state dict.  A :class:`WeightSource` knows every tensor's name, shape and dtype without reading data
(``meta()`` returns them as ``device="meta"`` tensors, on which the usual selection runs); ``read(keys)``
yields the requested tensors as stored, and ``read_into([(key, out), ...])`` copies each straight into a
caller-owned buffer (converting to its dtype: ``layerwise analyze`` reads bf16 weights into float32
buffers), opening the files for that call alone:

* ``.safetensors`` (one file, ``model-*.safetensors`` shards, or ``model.safetensors.index.json``): the
  header (an 8-byte length, then JSON with every tensor's dtype, shape and byte range) is parsed and
  checked here, and tensors are read with plain file reads: ``read_into`` reads 256 KiB at a time into a
  small staging buffer and converts it into ``out``, so no full-size copy in the stored dtype exists.
  (``safetensors.safe_open`` maps the file: every page read stays in the resident set until the file is
  closed.)
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` (one file, ``pytorch_model-*.bin`` shards, or
  ``pytorch_model.bin.index.json``): ``torch.load(mmap=True, weights_only=True)``, so opening a file reads
  only its pickle; the requested tensors are copied out of the mapping and the mapping is dropped (the
  pages of the tensors read in one call count in the resident set until then).  A file in the legacy
  (non-zip) format cannot be mapped: it is read whole once, with a warning.

Files are closed (unmapped) after every call: pages of a memory map count toward the process's resident
set for as long as the map is open, so keeping it open would make peak memory grow with the checkpoint
instead of with one batch.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from layerwise._safetensors import read_header

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

    def read_into(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each stored tensor ``key`` into its ``out`` (contiguous, the same number of elements; the
        values are converted to ``out``'s dtype), grouped by file; each file is opened for this call only."""
        by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        for k, out in items:
            if k not in self._files:
                raise KeyError(f"{self.path}: no tensor named {k!r}")
            if out.numel() != self._meta[k].numel() or not out.is_contiguous():
                raise ValueError(
                    f"{self.path}: tensor {k!r} has {self._meta[k].numel()} elements; the buffer to read it into "
                    f"must be contiguous with as many, got shape {tuple(out.shape)}"
                )
            by_file.setdefault(self._files[k], []).append((k, out))
        for f, its in by_file.items():
            self._read_file_into(f, its)

    def _read_file_into(self, f: Path, items: list[tuple[str, torch.Tensor]]) -> None:
        for (_, t), (_, out) in zip(self._read_file(f, [k for k, _ in items]), items):
            out.view(-1).copy_(t.reshape(-1))

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in memory at once (small checkpoints; :func:`load_state_dict`'s behaviour)."""
        return dict(self.read(self.keys()))

    def _read_file(self, f: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError


def _meta_like(t: Any) -> torch.Tensor:
    return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")


#: bytes read at a time by :meth:`SafetensorsSource.read_into` when the stored dtype differs from the buffer's
STAGING_BYTES = 1 << 18


def _readinto(fh: Any, offset: int, dst: torch.Tensor, f: Path) -> None:
    """Fill the contiguous ``dst`` with the bytes of ``fh`` from ``offset`` on (``SourceError`` if short)."""
    view = dst.reshape(-1).view(torch.uint8).numpy().data  # a writable memoryview of dst's bytes
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise SourceError(f"{f}: file ends early (truncated?): {len(view) - done} bytes missing at {offset + done}")
        done += n


class SafetensorsSource(WeightSource):
    """One or more ``.safetensors`` files (a file, a folder's shards, or an ``index.json`` weight map), read
    with plain file reads (see the module docstring)."""

    def __init__(self, path: Path, files: dict[str, Path], meta: dict[str, torch.Tensor], offsets: dict[str, int]):
        super().__init__(path, files, meta)
        self._offsets = offsets  # key -> absolute byte offset of its data in its file

    @staticmethod
    def _header(f: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """``({key: meta tensor}, {key: absolute data offset})`` of one file, every entry checked
        (:func:`layerwise._safetensors.read_header`)."""
        try:
            return read_header(f)
        except ValueError as exc:
            raise SourceError(str(exc)) from exc

    @classmethod
    def open(cls, path: Path, files: list[Path]) -> SafetensorsSource:
        where: dict[str, Path] = {}
        meta: dict[str, torch.Tensor] = {}
        offsets: dict[str, int] = {}
        for f in files:
            if not f.is_file():
                raise SourceError(f"{path}: shard {f.name} is listed but missing")
            m, o = cls._header(f)
            for k in m:
                if k in where:
                    raise SourceError(f"{path}: tensor {k!r} is in both {where[k].name} and {f.name}")
                where[k] = f
            meta.update(m)
            offsets.update(o)
        return cls(path, where, meta, offsets)

    @staticmethod
    def _open_file(f: Path) -> Any:
        try:
            return open(f, "rb")
        except OSError as exc:
            raise SourceError(f"{f}: cannot read: {exc}") from exc

    def _read_file(self, f: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        with self._open_file(f) as fh:
            for k in keys:
                m = self._meta[k]
                t = torch.empty(m.shape, dtype=m.dtype)
                if t.numel():
                    _readinto(fh, self._offsets[k], t, f)
                yield k, t

    def _read_file_into(self, f: Path, items: list[tuple[str, torch.Tensor]]) -> None:
        with self._open_file(f) as fh:
            staging: torch.Tensor | None = None
            for k, out in items:
                m, offset, flat = self._meta[k], self._offsets[k], out.view(-1)
                if not flat.numel():
                    continue
                if m.dtype == out.dtype:  # straight into the buffer
                    _readinto(fh, offset, flat, f)
                    continue
                step = max(1, STAGING_BYTES // m.element_size())
                if staging is None or staging.dtype != m.dtype or staging.numel() < min(step, flat.numel()):
                    staging = torch.empty(min(step, flat.numel()), dtype=m.dtype)
                for a in range(0, flat.numel(), step):
                    b = min(a + step, flat.numel())
                    piece = staging[: b - a]
                    _readinto(fh, offset + a * m.element_size(), piece, f)
                    flat[a:b].copy_(piece)


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
            mapped = from_checkpoint_obj(obj, f)
            for k, v in mapped.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if k in where:
                    raise SourceError(f"{path}: tensor {k!r} is in both {where[k].name} and {f.name}")
                where[k] = f
                meta[k] = _meta_like(v)
            del obj, mapped
        return cls(path, where, meta)

    def _read_file(self, f: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        obj = _torch_load(f, mmap=True)
        sd = from_checkpoint_obj(obj, f)
        # copies: the returned tensors must not keep the file mapped once this batch is done
        out = [(k, sd[k].clone()) for k in keys]
        del obj, sd
        yield from out

    def _read_file_into(self, f: Path, items: list[tuple[str, torch.Tensor]]) -> None:
        obj = _torch_load(f, mmap=True)
        sd = from_checkpoint_obj(obj, f)
        for k, out in items:  # from the mapping into the buffer: no copy in the stored dtype
            out.view(-1).copy_(sd[k].reshape(-1))
        del obj, sd


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

    def _read_file(self, f: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return self.read(keys)


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
