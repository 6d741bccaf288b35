"""``layerwise._safetensors.read_header``: malformed entries are a ``ValueError`` naming the file and the
tensor (files written by hand: 8-byte little-endian header length, JSON, data); unsigned dtypes are read."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from layerwise._safetensors import DTYPES, read_header


def _write(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(dict(dtype=["F32"], shape=[4], data_offsets=[0, 16]), id="dtype-list"),
        pytest.param(dict(dtype=None, shape=[4], data_offsets=[0, 16]), id="dtype-null"),
        pytest.param(dict(dtype="F32", shape=[True, 4], data_offsets=[0, 16]), id="dim-bool"),
        pytest.param(dict(dtype="F32", shape=[-1], data_offsets=[0, 16]), id="dim-negative"),
        pytest.param(dict(dtype="F32", shape=[4.0], data_offsets=[0, 16]), id="dim-float"),
        pytest.param(dict(dtype="F32", shape=["4"], data_offsets=[0, 16]), id="dim-str"),
        pytest.param(dict(dtype="F32", shape=4, data_offsets=[0, 16]), id="shape-int"),
        pytest.param(dict(dtype="F32", shape=[2**70], data_offsets=[0, 16]), id="dim-past-int64"),
        pytest.param(dict(dtype="F32", shape=[2**62, 2**62, 0], data_offsets=[0, 0]), id="size-past-int64"),
        pytest.param(dict(dtype="F32", shape=[4], data_offsets=[False, 16]), id="offset-bool"),
        pytest.param(dict(dtype="F32", shape=[4], data_offsets=[0, 32]), id="offset-past-end"),
        pytest.param(dict(dtype="F32", shape=[4]), id="no-offsets"),
        pytest.param(["F32", [4], [0, 16]], id="entry-list"),
    ],
)
def test_malformed_entry_names_file_and_tensor(tmp_path, entry):
    path = tmp_path / "bad.safetensors"
    _write(path, {"ok": dict(dtype="F32", shape=[1], data_offsets=[0, 4]), "t": entry}, bytes(20))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": tensor 't' has a malformed header entry"):
        read_header(path)


def test_wrong_byte_count_and_unknown_dtype_name_the_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    _write(path, {"t": dict(dtype="F32", shape=[3], data_offsets=[0, 16])}, bytes(16))
    with pytest.raises(ValueError, match=r"x.safetensors: tensor 't': 16 bytes stored for shape \(3,\) of F32"):
        read_header(path)
    _write(path, {"t": dict(dtype="Q32", shape=[4], data_offsets=[0, 16])}, bytes(16))
    with pytest.raises(ValueError, match=r"x.safetensors: tensor 't' has unsupported safetensors dtype Q32"):
        read_header(path)


def test_hand_written_file_reads(tmp_path):
    path = tmp_path / "x.safetensors"
    header = {
        "__metadata__": {"format": "pt"},
        "a": dict(dtype="BF16", shape=[2, 3], data_offsets=[0, 12]),
        "e": dict(dtype="F32", shape=[0, 5], data_offsets=[12, 12]),
        "s": dict(dtype="I64", shape=[], data_offsets=[12, 20]),
    }
    _write(path, header, bytes(20))
    meta, offsets = read_header(path)
    assert {k: (tuple(t.shape), t.dtype, t.device.type) for k, t in meta.items()} == {
        "a": ((2, 3), torch.bfloat16, "meta"),
        "e": ((0, 5), torch.float32, "meta"),
        "s": ((), torch.int64, "meta"),
    }
    start = 8 + len(json.dumps(header).encode())
    assert offsets == {"a": start, "e": start + 12, "s": start + 12}


def test_unsigned_dtypes_from_save_file_read_in_anatomy_from_path(tmp_path):
    from safetensors.torch import load_file, save_file

    from layerwise.anatomy import from_path

    sd = {
        "u16": torch.arange(6).to(torch.uint16).reshape(2, 3),
        "u32": torch.arange(12).to(torch.uint32).reshape(3, 4),
        "u64": torch.arange(5).to(torch.uint64),
        "u8": torch.zeros(2, dtype=torch.uint8),
    }
    save_file(sd, str(tmp_path / "u.safetensors"))
    assert (DTYPES["U16"], DTYPES["U32"], DTYPES["U64"]) == (torch.uint16, torch.uint32, torch.uint64)
    got, _ = from_path(tmp_path / "u.safetensors")
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in got.items()} == {
        k: (tuple(v.shape), v.dtype, "meta") for k, v in sd.items()
    }
    # the offsets point at the stored bytes
    meta, offsets = read_header(tmp_path / "u.safetensors")
    raw = (tmp_path / "u.safetensors").read_bytes()
    for k, t in load_file(str(tmp_path / "u.safetensors")).items():
        n = t.numel() * t.element_size()
        assert raw[offsets[k] : offsets[k] + n] == t.contiguous().view(torch.uint8).numpy().tobytes()
        assert meta[k].dtype == t.dtype
