"""``train.compile=true`` trains (torch.compile with the default inductor backend) and matches eager (issue 20).

Kept cheap: the ``smoke`` preset's nano model, 4 steps, no evaluation in between; the compiled graph is
small.  Compiled and eager kernels round differently, so losses agree to float32 tolerance, not bitwise.
"""

from __future__ import annotations

import pytest
import torch
from tests._helpers import read_jsonl

from layerwise.lab import config as C
from layerwise.lab.train import train


def _cfg(corpus, compile_: bool, backend: str = "inductor"):
    return C.resolve(
        "smoke",
        None,
        [
            f"data.corpus={corpus}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.max_steps=4",
            "train.eval_every=0",
            "train.log_every=1",
            f"train.compile={'true' if compile_ else 'false'}",
            f"train.compile_backend={backend}",
        ],
    )


@pytest.mark.timeout(1200)  # ~20 CPU-seconds of tracing; generous for a loaded machine
def test_compiled_training_matches_eager(tmp_path, corpus_file):
    """The harness's compile path (dynamo capture + AOT autograd of forward and backward) through the
    ``aot_eager`` backend: the same graph inductor would receive, without its C++ code generation, which
    costs ~40 CPU-seconds here and is exercised by benchmarks/train_vs_hf.py and gpu_check.py instead."""
    eager = train(_cfg(corpus_file, False), tmp_path / "eager", quiet=True)
    torch._dynamo.reset()
    comp = train(_cfg(corpus_file, True, "aot_eager"), tmp_path / "compiled", quiet=True)
    torch._dynamo.reset()
    le = [r["loss"] for r in read_jsonl(tmp_path / "eager" / "metrics.jsonl") if "loss" in r]
    lc = [r["loss"] for r in read_jsonl(tmp_path / "compiled" / "metrics.jsonl") if "loss" in r]
    assert len(le) == len(lc) == 4
    assert lc == pytest.approx(le, rel=2e-4, abs=1e-5)
    assert le[-1] < le[0]  # it trains
    assert comp["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=2e-4)
    a = torch.load(tmp_path / "eager/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled/checkpoints/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()  # the checkpoint holds plain names, not _orig_mod.*
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_compile_config_errors_name_the_key(corpus_file):
    from layerwise.lab.train import validate

    with pytest.raises(C.ConfigError, match="train.compile_backend"):
        validate(_cfg(corpus_file, True, "no_such_backend"))
    cfg = _cfg(corpus_file, True)
    cfg.train.compile_mode = "fastest"
    with pytest.raises(C.ConfigError, match="train.compile_mode"):
        validate(cfg)
