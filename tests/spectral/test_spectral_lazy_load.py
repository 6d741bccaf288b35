"""``layerwise analyze`` reads weights lazily, in bounded batches, from files and sharded folders (issue 20)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from layerwise.lab import analyze as cli
from layerwise.lab.model import build_model
from layerwise.lab.weight_source import SafetensorsSource, TorchFileSource
from layerwise.spectral import analyze


def _parse(argv):
    parser = argparse.ArgumentParser(prog="layerwise")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["analyze", *argv])


@pytest.fixture(scope="module")
def hf_sd():
    torch.manual_seed(0)
    m = build_model("nano", vocab_size=64)
    sd = {}
    for k, v in m.state_dict().items():
        sd[k if k.startswith("lm_head") else "model." + k] = v.detach().clone().contiguous()
    return sd


def _write_sharded(folder, sd, fmt, n_shards=3):
    from safetensors.torch import save_file

    folder.mkdir()
    keys = sorted(sd)
    parts = [keys[i::n_shards] for i in range(n_shards)]
    ext = "safetensors" if fmt == "st" else "bin"
    stem = "model" if fmt == "st" else "pytorch_model"
    weight_map = {}
    for i, ks in enumerate(parts):
        name = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{ext}"
        part = {k: sd[k] for k in ks}
        if fmt == "st":
            save_file(part, str(folder / name))
        else:
            torch.save(part, folder / name)
        weight_map.update({k: name for k in ks})
    index = folder / (f"{stem}.safetensors.index.json" if fmt == "st" else f"{stem}.bin.index.json")
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


class _Counting:
    """Records which keys a real source is asked for, and how many in one call."""

    def __init__(self, src):
        self.src, self.calls = src, []

    def __getattr__(self, name):
        return getattr(self.src, name)

    def read(self, keys):
        keys = list(keys)
        self.calls.append(keys)
        return self.src.read(keys)

    def read_into(self, items):
        items = list(items)
        self.calls.append([k for k, _ in items])
        return self.src.read_into(items)


@pytest.mark.parametrize("fmt", ["st", "bin"])
def test_sharded_folder_lazy_batches_equal_eager(tmp_path, hf_sd, fmt):
    _write_sharded(tmp_path / "hf", hf_sd, fmt)
    src, out_dir = cli.open_weights(tmp_path / "hf")
    assert out_dir == tmp_path / "hf"
    assert isinstance(src, SafetensorsSource if fmt == "st" else TorchFileSource)
    assert sorted(src.keys()) == sorted(hf_sd)
    assert all(t.device.type == "meta" for t in src.meta().values())
    ref = analyze(hf_sd, estimator="ks", keep_eigs=True)
    counting = _Counting(src)
    rep = cli.analyze_source(counting, estimator="ks", batch_bytes=1, keep_eigs=True)  # one matrix per batch
    assert [r["name"] for r in rep.rows] == [r["name"] for r in ref.rows]
    for a, b in zip(rep.rows, ref.rows):
        assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-6, nan_ok=True)
        assert a["spectral_norm"] == pytest.approx(b["spectral_norm"], rel=1e-6)
        assert torch.allclose(rep.eigs[a["name"]], ref.eigs[b["name"]], rtol=1e-5, atol=0)
    # lazily: one tensor per read, and only the selected ones (no embedding, head or norm was read)
    read = [k for c in counting.calls for k in c]
    assert all(len(c) == 1 for c in counting.calls)
    assert sorted(read) == sorted(r["name"] for r in ref.rows)  # HF names are already canonical
    assert not any("embed" in k or "norm" in k for k in read)
    # the default budget batches same-shape matrices together and gives the same rows
    rep2 = cli.analyze_source(src, estimator="ks")
    assert [r["alpha"] for r in rep2.rows] == pytest.approx([r["alpha"] for r in ref.rows], rel=1e-6)


def test_plan_groups_by_shape_within_budget():
    meta = lambda *s, dt=torch.bfloat16: torch.empty(s, dtype=dt, device="meta")  # noqa: E731
    chosen = [("a", meta(8, 16)), ("b", meta(16, 8)), ("c", meta(8, 16)), ("d", meta(8, 16))]
    cost = 4 * 8 * 16 + 4 * 8 * 8  # float32 copy (what is read) + Gram, whatever the stored dtype
    assert cli._plan(chosen, 2 * cost) == [["a", "c"], ["d"], ["b"]]
    assert cli._plan(chosen, 1) == [["a"], ["c"], ["d"], ["b"]]
    # default: half the bound (2x the largest float32 matrix + its Gram): 64x16 -> 4608 bytes, 6 small ones
    big = [("big", meta(64, 16))] + chosen
    assert cli.memory_bound(big) == 2 * 4 * 64 * 16 + 4 * 16 * 16
    assert cli._plan(big, None) == [["big"], ["a", "c", "d"], ["b"]]
    assert cli._plan(chosen + [("i", meta(8, 16, dt=torch.int64))], None)[-1] == ["i"]  # other dtypes apart


def test_cli_sharded_index_and_errors(tmp_path, hf_sd, capsys):
    index = _write_sharded(tmp_path / "hf", hf_sd, "st")
    assert cli.run(_parse([str(tmp_path / "hf"), "--no-plots", "--batch-mb", "0.01"])) == 0
    rows = json.loads((tmp_path / "hf" / "spectral.json").read_text())["rows"]
    assert len(rows) == len(analyze(hf_sd).rows) and all(math.isfinite(r["alpha"]) for r in rows)
    capsys.readouterr()
    assert cli.run(_parse([str(tmp_path / "hf"), "--batch-mb", "0"])) == 2
    assert "--batch-mb" in capsys.readouterr().err
    assert cli.run(_parse([str(tmp_path / "hf"), "--device", "tpu"])) == 2
    assert "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.run(_parse([str(tmp_path / "hf"), "--device", "cuda"])) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    # a shard named by the index but missing
    data = json.loads(index.read_text())
    data["weight_map"]["model.extra.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    assert cli.run(_parse([str(tmp_path / "hf")])) == 2
    assert "model-00009-of-00009.safetensors" in capsys.readouterr().err
    index.write_text("{not json")
    assert cli.run(_parse([str(tmp_path / "hf")])) == 2
    assert "not a valid shard index" in capsys.readouterr().err


def test_torch_checkpoint_mmap_and_legacy(tmp_path, hf_sd):
    torch.save({"model": hf_sd, "step": 3}, tmp_path / "ck.pt")
    src, _ = cli.open_weights(tmp_path / "ck.pt")
    assert isinstance(src, TorchFileSource)
    k = "model.layers.0.self_attn.q_proj.weight"
    ((name, t),) = list(src.read([k]))
    assert name == k and torch.equal(t, hf_sd[k])
    torch.save(hf_sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="legacy"):
        src2, _ = cli.open_weights(tmp_path / "legacy.pt")
    assert [r["alpha"] for r in cli.analyze_source(src2).rows] == pytest.approx(
        [r["alpha"] for r in analyze(hf_sd).rows], rel=1e-6
    )


def test_safetensors_read_into_converts_in_pieces_and_checks_the_header(tmp_path, monkeypatch):
    """``read_into`` reads bf16 in staging pieces (one partial) into a float32 buffer, exactly the converted
    values; float32 is read straight in; ``read`` gives tensors as stored; bad files are named."""
    from safetensors.torch import save_file

    from layerwise.lab import weight_source as ws

    gen = torch.Generator().manual_seed(0)
    sd = {
        "w": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "f": torch.randn(3, 4, generator=gen),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e": torch.empty(0, 4),
    }
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    src = ws.SafetensorsSource.open(tmp_path, [tmp_path / "m.safetensors"])
    assert {k: (tuple(t.shape), t.dtype) for k, t in src.meta().items()} == {
        k: (tuple(t.shape), t.dtype) for k, t in sd.items()
    }
    monkeypatch.setattr(ws, "STAGING_BYTES", 8)  # 4 bf16 values a piece: 35 = 8 pieces + 3
    w, f, e = torch.full((7, 5), float("nan")), torch.full((12,), float("nan")), torch.empty(0)
    src.read_into([("w", w), ("f", f), ("e", e)])
    assert torch.equal(w, sd["w"].float()) and torch.equal(f, sd["f"].reshape(-1))
    got = dict(src.read(["i", "w"]))
    assert torch.equal(got["i"], sd["i"]) and got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], sd["w"])
    with pytest.raises(ValueError, match="'w' has 35 elements"):
        src.read_into([("w", torch.empty(34))])
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])  # data cut short: the last tensor's range is outside
    with pytest.raises(ws.SourceError, match="cut.safetensors: tensor .* malformed header entry"):
        ws.SafetensorsSource.open(tmp_path, [tmp_path / "cut.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ws.SourceError, match="junk.safetensors: cannot read as safetensors"):
        ws.SafetensorsSource.open(tmp_path, [tmp_path / "junk.safetensors"])
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01")
    with pytest.raises(ws.SourceError, match="tiny.safetensors: not a safetensors file"):
        ws.SafetensorsSource.open(tmp_path, [tmp_path / "tiny.safetensors"])
