"""``layerwise export`` / ``generate``: a run becomes a plain Hugging Face folder with the run's logits."""

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from layerwise.lab import config as C  # noqa: E402
from layerwise.lab.cli import main  # noqa: E402
from layerwise.lab.export import ExportError, export_run, generate, load_run_model  # noqa: E402
from layerwise.lab.train import train  # noqa: E402


def _cfg(corpus, *over):
    return C.resolve(
        "smoke",
        None,
        [
            f"data.corpus={corpus}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.max_steps=6",
            "train.eval_every=0",
            "train.log_every=3",
            *over,
        ],
    )


def _assert_same_logits(run, out, vocab):
    model, _, _ = load_run_model(run)
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).double()
        got = hf(ids).logits.double()
    assert (got - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 1e-3  # not trivially zero
    return hf


@pytest.mark.parametrize(
    "extra",
    [
        ["multipliers.kind=rowcol"],  # multipliers merged
        ["model.parametrization=mup", "model.base_hidden_size=16", "model.attn_scale=mup"],  # readout/attn folded
    ],
    ids=["multipliers", "mup"],
)
def test_export_reloads_with_equal_logits(tmp_path, corpus_file, extra):
    run = tmp_path / "run"
    train(_cfg(corpus_file, *extra), run, quiet=True)
    out = export_run(run, tmp_path / "hf")
    assert out == tmp_path / "hf"
    hf = _assert_same_logits(run, out, 512)
    assert isinstance(hf, LlamaForCausalLM)
    sd = hf.state_dict()
    assert not any("multiplier" in k for k in sd)
    # the run's model really carried multipliers / muP factors, so merging/folding was not a no-op
    model, _, _ = load_run_model(run)
    if "multipliers.kind=rowcol" in extra:
        assert any("multiplier" in k for k in model.state_dict())
    else:
        assert model.readout_mult == 0.5
    tok = AutoTokenizer.from_pretrained(out)
    fast = PreTrainedTokenizerFast.from_pretrained(out)
    text = "KING. Now thou art fair"
    assert tok.decode(tok(text).input_ids) == text == fast.decode(fast(text).input_ids)
    assert tok.eos_token == "<|endoftext|>" and hf.config.eos_token_id == tok.eos_token_id == 0
    info = json.loads((out / "layerwise_export.json").read_text())
    assert info["step"] == 6


def test_export_errors_and_replacement(tmp_path, corpus_file):
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "x")
    run = tmp_path / "run"
    train(_cfg(corpus_file), run, quiet=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_run(run, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    assert main(["export", str(run), str(out)]) == 0  # an earlier export is replaced
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(tmp_path.glob(".hf.tmp*"))
    # greedy generation is deterministic and continues the prompt, from the run dir and the HF folder alike
    a = generate(run, "KING.", max_new_tokens=5, temperature=0)
    b = generate(out, "KING.", max_new_tokens=5, temperature=0)
    assert a == b and a.startswith("KING.") and len(a) > len("KING.")
    assert main(["generate", str(out), "--prompt", "KING.", "--max-new-tokens", "3", "--temperature", "0.7"]) == 0
    assert main(["generate", str(tmp_path / "busy"), "--prompt", "x"]) == 2
