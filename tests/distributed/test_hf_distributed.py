"""An HF model (tiny Qwen2 from config) under FSDP2 with 2 gloo processes == one process; the sharded run
exports like the single-process one.

The two ranks are forked from the test process (torch, transformers and the model code already imported:
about 20 s less CPU than a torchrun launch on 2 cores) and join a real gloo process group through the
environment, exactly as under torchrun."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _fsdp import forked_ranks

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)


def _train_rank(rank: int, cfg_dict: dict, run_dir: str) -> None:
    from layerwise.lab.config import from_dict
    from layerwise.lab.train import train

    train(from_dict(cfg_dict), run_dir, quiet=True)


def _two_ranks(cfg_dict: dict, run_dir) -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # an earlier test left a process group here: forked ranks would inherit it
        _torchrun(cfg_dict, run_dir)
        return
    codes = forked_ranks(_train_rank, cfg_dict, str(run_dir))
    assert codes == [0, 0], f"rank exit codes {codes}"


def _torchrun(cfg_dict: dict, run_dir) -> None:
    import subprocess

    from layerwise.lab.config import from_dict, to_toml

    cfg_file = Path(run_dir).with_suffix(".toml")
    cfg_file.write_text(to_toml(from_dict(cfg_dict)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "layerwise",
        "train",
        "--config",
        str(cfg_file),
        "--out",
        str(run_dir),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_hf_qwen2_fsdp_equals_single_process_and_exports(tmp_path, corpus_file):
    from layerwise.lab import config as C
    from layerwise.lab.data import prepare_config
    from layerwise.lab.distributed import load_sharded_model_state
    from layerwise.lab.export import export_run
    from layerwise.lab.train import train

    over = [
        f"data.corpus={corpus_file}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.max_steps=4",
        "train.eval_every=0",
        "train.log_every=2",
        "train.batch_size=4",
        "multipliers.kind=rowcol",
    ]
    vocab = prepare_config(C.resolve("smoke", None, over).data).vocab_size
    transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ).save_pretrained(str(tmp_path / "qwen2"))
    over.append(f"model.hf_config={tmp_path / 'qwen2'}")
    one = train(C.resolve("smoke", None, over), tmp_path / "one", quiet=True)
    _two_ranks(C.resolve("smoke", None, over + ["train.parallel=fsdp"]).to_dict(), tmp_path / "two")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-5)
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)["model"]
    b = load_sharded_model_state(tmp_path / "two/checkpoints/last.dcp")
    assert a.keys() == b.keys() and any(k.endswith("row_multiplier") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    e1 = transformers.AutoModelForCausalLM.from_pretrained(str(export_run(tmp_path / "one", tmp_path / "e1")))
    e2 = transformers.AutoModelForCausalLM.from_pretrained(str(export_run(tmp_path / "two", tmp_path / "e2")))
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(e1(ids).logits, e2(ids).logits, rtol=1e-4, atol=1e-4)
