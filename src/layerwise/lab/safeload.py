"""Reading ``torch.distributed.checkpoint`` (DCP) folders without running code from them.

A DCP folder is not safe to open with torch's own reader: its ``.metadata`` file is a plain pickle
(``FileSystemReader.read_metadata`` calls ``pickle.load``), and the non-tensor entries of the state dict
(optimizer hyper-parameters, ...) are read back by the load planner with ``torch.load(weights_only=False)``.
Either one runs arbitrary code from a crafted folder.  This module closes both holes:

* :class:`SafeFileSystemReader` reads ``.metadata`` with :class:`MetadataUnpickler`, which resolves only
  DCP's own metadata classes and the few torch / stdlib values they hold (``torch.Size``, dtypes, layouts,
  ``pathlib`` paths); any other global is refused with :class:`UnsafeCheckpointError`.  It also refuses
  storage entries whose file lies outside the checkpoint folder.
* :class:`SafeLoadPlanner` and :class:`SafeFullLoadPlanner` read the non-tensor entries with
  ``torch.load(weights_only=True)``.  Tensor entries are already read that way by torch.

Every DCP read of the harness goes through :func:`load_dcp` (into an existing, possibly sharded, state dict:
``train --resume`` of an FSDP run) or :func:`load_dcp_full` (the whole checkpoint in one process, no process
group: ``layerwise analyze``).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

__all__ = [
    "UnsafeCheckpointError",
    "UnreadableCheckpointError",
    "MetadataUnpickler",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "SafeFullLoadPlanner",
    "read_metadata",
    "load_dcp",
    "load_dcp_full",
]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks to load something other than plain data (a refused pickle global, a path
    outside the checkpoint folder)."""


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file is truncated or garbage (not an attack; an older checkpoint may be used instead)."""


_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_META: frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint._extension": frozenset(),  # transform descriptors are plain strings
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),  # name -> torch.layout lookup
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "list", "dict", "tuple"}),
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only DCP metadata: any global outside a short allow-list is refused."""

    def __init__(self, file, *, source: str = "<stream>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load {module}.{name} (a DCP .metadata file "
            "holds only checkpoint metadata; this one asks for other code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source}: unexpected persistent id in DCP metadata")


def read_metadata(path: str | os.PathLike, rank: int | None = None) -> Metadata:
    """The :class:`Metadata` of the DCP folder ``path``, read with :class:`MetadataUnpickler`."""
    return SafeFileSystemReader(path).read_metadata(rank=rank)


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is unpickled with an allow-list (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = MetadataUnpickler(f, source=str(path)).load()
        except UnsafeCheckpointError:
            raise
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated / garbage pickle
            raise UnreadableCheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise UnreadableCheckpointError(f"{path}: not DCP metadata (got {type(metadata).__name__})")
        root = Path(self.path).resolve()
        for info in (metadata.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if not isinstance(rel, str) or not (root / rel).resolve().is_relative_to(root):
                raise UnsafeCheckpointError(f"{path}: storage entry {rel!r} lies outside the checkpoint folder")
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is None:
            storage_meta = metadata.storage_meta = StorageMeta()
        storage_meta.load_id = self.load_id
        return metadata


def _load_plain(value: io.BytesIO) -> Any:
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"DCP checkpoint entry refused by weights_only=True: {e}") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = _load_plain(value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeFullLoadPlanner(_EmptyStateDictLoadPlanner, SafeLoadPlanner):
    """Rebuilds the whole state dict from the metadata (one process), non-tensor entries read safely."""


def _unwrap(e: BaseException, path) -> RuntimeError:
    """torch's ``CheckpointException`` (a ``BaseException``, one entry per failed rank) as one of ours."""
    failures = getattr(e, "failures", {}) or {}
    for exc, _ in failures.values():
        if isinstance(exc, UnsafeCheckpointError):
            return exc
    first = next(iter(failures.values()), (e, None))[0]
    text = str(first).strip().splitlines()
    return UnreadableCheckpointError(
        f"{path}: cannot read the DCP checkpoint ({type(first).__name__}: {text[0] if text else ''})"
    )


def load_dcp(state: dict, path: str | os.PathLike) -> None:
    """``dcp.load(state, checkpoint_id=path)`` through the safe reader and planner (collective under a
    process group, like ``dcp.load``).  Failures raise :class:`UnsafeCheckpointError` or
    :class:`UnreadableCheckpointError` on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_metadata(path)  # refuse a crafted .metadata with its own error before torch's planner runs
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except CheckpointException as e:
        raise _unwrap(e, path) from None


def load_dcp_full(path: str | os.PathLike) -> dict[str, Any]:
    """The whole state dict of the DCP folder ``path``, read in this process without a process group."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    read_metadata(path)
    sd: dict[str, Any] = {}
    try:
        _load_state_dict(sd, storage_reader=SafeFileSystemReader(path), planner=SafeFullLoadPlanner(), no_dist=True)
    except CheckpointException as e:
        raise _unwrap(e, path) from None
    return sd
