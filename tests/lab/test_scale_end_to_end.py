"""Issue 15's done-when: generated JSONL + a local 70,000-token tokenizer.json (uint32 shards, parallel
workers) -> tiny Qwen2 and Falcon-H1 from config, compared with adamw / alphadecay / multipliers -> one run
exported and reloaded with equal logits."""

import json
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from layerwise.lab.cli import main  # noqa: E402
from layerwise.lab.data import prepare  # noqa: E402
from layerwise.lab.export import load_run_model  # noqa: E402

V = 70_000


def _tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(V - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[UNK]", "<|endoftext|>"])
    tok.save(str(path))


def test_jsonl_70k_tokenizer_qwen2_falcon_h1_compare_and_export(tmp_path):
    rng = random.Random(0)
    # a few thousand documents; word ids from a heavy tail, so ids above 65,535 occur
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(3000):
            words = [f"w{min(V - 3, int(rng.paretovariate(0.35)) - 1)}" for _ in range(rng.randint(5, 15))]
            f.write(json.dumps({"content": " ".join(words)}) + "\n")
    _tokenizer(tmp_path / "tokenizer.json")
    data = [
        f"data.corpus={tmp_path / 'docs.jsonl'}",
        "data.text_field=content",
        f"data.tokenizer={tmp_path / 'tokenizer.json'}",
        "data.num_proc=2",
        "data.max_valid_tokens=256",
    ]
    assert (
        main(
            [
                "data",
                "prepare",
                "--corpus",
                str(tmp_path / "docs.jsonl"),
                "--text-field",
                "content",
                "--tokenizer",
                str(tmp_path / "tokenizer.json"),
                "--num-proc",
                "2",
                "--max-valid-tokens",
                "256",
            ]
        )
        == 0
    )
    td = prepare(
        str(tmp_path / "docs.jsonl"),
        text_field="content",
        tokenizer=str(tmp_path / "tokenizer.json"),
        max_valid_tokens=256,
        num_proc=2,
    )
    assert td.meta["num_proc"] == 2 and td.train.dtype == np.uint32 and td.vocab_size == V
    assert int(np.asarray(td.train).max()) > 65535 and td.val.size == 256
    common = dict(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    transformers.Qwen2Config(**common, tie_word_embeddings=False).save_pretrained(str(tmp_path / "qwen2"))
    transformers.FalconH1Config(
        **common, head_dim=8, mamba_d_ssm=16, mamba_n_heads=2, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16
    ).save_pretrained(str(tmp_path / "falcon"))
    run_over = [
        "train.max_steps=3",
        "train.eval_every=0",
        "train.log_every=3",
        "train.batch_size=2",
        "data.seq_len=32",
        "decay.interval=2",
        "train.progress=false",
        "train.tensorboard=false",
        "train.diagnostics_every=0",
        "optim.schedule=wsd",
    ]
    for arch in ("qwen2", "falcon"):
        out = tmp_path / f"cmp-{arch}"
        sets = [x for o in data + run_over + [f"model.hf_config={tmp_path / arch}"] for x in ("--set", o)]
        assert (
            main(
                [
                    "compare",
                    "--preset",
                    "smoke",
                    "--methods",
                    "adamw,alphadecay,multipliers",
                    "--seeds",
                    "1",
                    "--out",
                    str(out),
                    *sets,
                ]
            )
            == 0
        )
        res = json.loads((out / "results.json").read_text())
        rows = {r["method"]: r for r in res["rows"]}
        assert set(rows) == {"adamw", "alphadecay", "multipliers"}
        assert all(np.isfinite(r["val_loss"]) and r["val_loss"] < np.log(V) + 1 for r in rows.values())
        assert len({round(r["val_loss"], 9) for r in rows.values()}) == 3  # three different trainings
    run = tmp_path / "cmp-falcon" / "multipliers" / "seed0"
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    model, _, _ = load_run_model(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"))
    assert type(hf).__name__ == "FalconH1ForCausalLM" and hf.config.vocab_size == V
    ids = torch.from_numpy(np.asarray(td.val[:24]).astype(np.int64))[None]
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
    assert tok.eos_token == "<|endoftext|>" and tok.convert_tokens_to_ids("w69000") == 69002
