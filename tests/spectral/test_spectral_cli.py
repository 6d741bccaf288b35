import argparse
import json
import math

import pytest
import torch

from layerwise.lab import analyze as cli
from layerwise.lab.model import build_model


def _parse(argv):
    parser = argparse.ArgumentParser(prog="layerwise")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    return parser.parse_args(["analyze", *argv])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("nano", vocab_size=64)


def test_run_directory(tmp_path, tiny, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"model": tiny.state_dict(), "step": 7}, run_dir / "checkpoints" / "last.pt")
    args = _parse([str(run_dir), "--include-embeddings", "--plot-esd", "layers.0.mlp.down_proj.weight"])
    assert args.func is cli.run
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "layers.0.self_attn.q_proj.weight" in out and "embed_tokens.weight" in out
    data = json.loads((run_dir / "spectral.json").read_text())
    assert any(r["module_type"] == "embed" for r in data["rows"])
    assert (run_dir / "plots" / "spectral_alpha_heatmap.png").stat().st_size > 0
    assert (run_dir / "plots" / "esd_layers.0.mlp.down_proj.weight.png").stat().st_size > 0


def test_files_and_hf_folder_give_same_alphas(tmp_path, tiny):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    torch.save(sd, tmp_path / "raw.pt")
    save_file(sd, str(tmp_path / "w.safetensors"))
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(
        {("model." + k if not k.startswith("lm_head") else k): v for k, v in sd.items()}, str(hf / "model.safetensors")
    )
    alphas = []
    for path, out in [
        (tmp_path / "raw.pt", tmp_path / "o1"),
        (tmp_path / "w.safetensors", tmp_path / "o2"),
        (hf, tmp_path / "o3"),
    ]:
        assert cli.run(_parse([str(path), "--out", str(out), "--estimator", "ks", "--no-plots"])) == 0
        rows = json.loads((out / "spectral.json").read_text())["rows"]
        alphas.append([r["alpha"] for r in rows])
        assert rows[0]["name"].endswith("layers.0.self_attn.q_proj.weight")
    assert alphas[0] == alphas[1] == alphas[2] and all(math.isfinite(a) for a in alphas[0])


def test_clear_errors(tmp_path, capsys):
    assert cli.run(_parse([str(tmp_path / "missing.pt")])) == 2
    assert "no such file or directory" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert cli.run(_parse([str(bad)])) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "empty_dir").mkdir()
    assert cli.run(_parse([str(tmp_path / "empty_dir")])) == 2
    assert "checkpoints/last.pt" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("")
    assert cli.run(_parse([str(tmp_path / "x.txt")])) == 2
    assert "unknown file type" in capsys.readouterr().err
    torch.save({"model": {"norm.weight": torch.ones(4)}}, tmp_path / "nomat.pt")
    assert cli.run(_parse([str(tmp_path / "nomat.pt")])) == 2
    assert "no weight matrices" in capsys.readouterr().err
