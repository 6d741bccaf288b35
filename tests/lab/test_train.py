import json
import math

import pytest
import torch
from tests._helpers import read_jsonl

from layerwise.lab import config as C
from layerwise.lab.cli import main
from layerwise.lab.train import NonFiniteLossError, atomic_torch_save, load_checkpoint, make_schedule, train


def _cfg(corpus, **over):
    cfg = C.resolve("smoke", None, [f"data.corpus={corpus}", "train.progress=false", "train.tensorboard=false"])
    return C.apply_overrides(cfg, over)


@pytest.mark.parametrize(
    "method",
    [{}, {"optim.name": "muon", "decay.name": "alphadecay", "decay.interval": 3}],
    ids=["adamw", "muon+alphadecay"],
)
def test_resume_equals_uninterrupted(tmp_path, corpus_file, method):
    # with a decay controller the trainer builds one group per block matrix (the controller's layout)
    full = train(
        _cfg(corpus_file, **{"train.max_steps": 16, "train.eval_every": 8, **method}), tmp_path / "full", quiet=True
    )
    # interrupt by training the full config but killing after step 8: emulate with ckpt at 8 then resume
    cfg = _cfg(corpus_file, **{"train.max_steps": 16, "train.eval_every": 8, **method})
    run = tmp_path / "resumed"
    _train_until(cfg, run, stop_after=8)
    resumed = train(cfg, run, resume=True, quiet=True)
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoints/last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 16


class _Stop(Exception):
    pass


def _train_until(cfg, run, stop_after):
    """Run the real trainer and interrupt it (like Ctrl-C) right after the checkpoint of ``stop_after``."""
    import layerwise.lab.train as T

    real = T.atomic_torch_save

    def save_then_stop(obj, path):
        real(obj, path)
        if obj.get("step") == stop_after:
            raise _Stop

    T.atomic_torch_save = save_then_stop
    try:
        with pytest.raises(_Stop):
            train(cfg, run, quiet=True)
    finally:
        T.atomic_torch_save = real


def test_interrupted_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2, "bad": Boom()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".ck.pt.tmp*"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus_file):
    run = tmp_path / "r"
    train(_cfg(corpus_file, **{"train.max_steps": 10, "train.eval_every": 10}), run, quiet=True)
    cfg = _cfg(
        corpus_file,
        **{
            "train.max_steps": 20,
            "train.eval_every": 10,
            "optim.lr": 1e30,
            "optim.warmup_frac": 0.0,
            "optim.grad_clip": 0.0,
        },
    )
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        train(cfg, run, resume=True, quiet=True, allow_changes=True)
    ck = load_checkpoint(run / "checkpoints/last.pt")
    assert ck["step"] == 10
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_lr_schedule_warmup_then_cosine_to_min():
    f = make_schedule(100, 0.1, 0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert f(100) == pytest.approx(0.1)


def test_cli_train_end_to_end_and_resume(tmp_path, corpus_file, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "train",
            "--preset",
            "smoke",
            "--set",
            f"data.corpus={corpus_file}",
            "--set",
            "train.progress=false",
            "--set",
            "train.max_steps=10",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_val_loss", "final_val_ppl", "steps", "tokens", "wall_s"):
        assert key in summary
    assert summary["final_val_ppl"] == pytest.approx(math.exp(summary["final_val_loss"]))
    assert (out / "config.toml").exists() and list((out / "tb").iterdir())
    rec = read_jsonl(out / "metrics.jsonl")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rec[0])
    rc = main(["train", "--resume", str(out), "--set", "train.max_steps=12", "--allow-changes"])
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    rc = main(["train", "--preset", "smoke", "--set", "optim.lrr=1"])
    assert rc == 2 and "optim.lrr" in capsys.readouterr().err


def test_validation_loss_is_exact_token_weighted_mean(tmp_path, corpus_file):
    import torch.nn.functional as F

    from layerwise.lab.data import prepare
    from layerwise.lab.model import build_model
    from layerwise.lab.train import evaluate

    td = prepare(str(corpus_file), vocab_size=512)
    model = build_model("nano", vocab_size=td.vocab_size)
    val = td.val[:1000]
    got = evaluate(model, val, 32, "cpu", __import__("contextlib").nullcontext, batch=7)
    with torch.no_grad():  # reference: one long pass over all targets, token by token windows of 32
        total, n = 0.0, 0
        for s in range(0, len(val) - 1, 32):
            w = torch.from_numpy(val[s : s + 33].astype("int64"))[None]
            total += F.cross_entropy(model(w[:, :-1])[0].double(), w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    assert got == pytest.approx(total / n, rel=1e-6)


def test_multipliers_run_exports_merged_checkpoint_with_equal_outputs(tmp_path, corpus_file):
    from layerwise.lab.model import LlamaModel, ModelConfig
    from layerwise.multipliers import add_multipliers

    run = tmp_path / "m"
    train(
        _cfg(
            corpus_file,
            **{"train.max_steps": 6, "multipliers.kind": "rowcol", "train.diagnostics_every": 3, "train.log_every": 3},
        ),
        run,
        quiet=True,
    )
    last = load_checkpoint(run / "checkpoints/last.pt")
    merged = load_checkpoint(run / "checkpoints/merged.pt")
    assert any(k.endswith("row_multiplier") for k in last["model"])
    assert not any("multiplier" in k for k in merged["model"])
    mcfg = ModelConfig(**merged["model_config"])
    wrapped = LlamaModel(mcfg)
    add_multipliers(wrapped, kind="rowcol", placement="paper")
    wrapped.load_state_dict(last["model"])
    plain = LlamaModel(mcfg)
    plain.load_state_dict(merged["model"])
    x = torch.randint(0, mcfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), wrapped(x), rtol=1e-5, atol=1e-6)
    rec = read_jsonl(run / "metrics.jsonl")
    assert "resid_rms/last" in rec[0] and any(k.startswith("mult/") for k in rec[0])
    # the multipliers were moved by training, so the test above compares two different functions of them
    assert any((v - 1).abs().max() > 1e-4 for k, v in last["model"].items() if k.endswith("multiplier"))


def test_metrics_log_writes_strict_json(tmp_path):
    """A non-finite metric (a lagged NaN loss or gradient norm tensor) is written as null, never as NaN."""
    import json as _json

    from layerwise.lab.train import MetricsLog

    log = MetricsLog(tmp_path, None, tensorboard=False)
    log.write({"step": 3, "loss": torch.tensor(float("nan")), "grad_norm": torch.tensor(float("inf")), "lr": 0.5})
    log.write({"step": 4, "loss": torch.tensor(2.5), "scales": torch.tensor([1.0, float("-inf")])})
    log.close()

    def no_constants(name):
        raise AssertionError(f"{name} in metrics.jsonl")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    recs = [_json.loads(ln, parse_constant=no_constants) for ln in lines]
    assert recs == [
        {"step": 3, "loss": None, "grad_norm": None, "lr": 0.5},
        {"step": 4, "loss": 2.5, "scales": [1.0, None]},
    ]
