"""``layerwise eval``: lm-evaluation-harness on a local multiple-choice cloze, checked against log-likelihoods
computed here by hand with the model itself (float64), fully offline."""

from __future__ import annotations

import importlib.metadata
import json
import math
import socket
import sys

import pytest
import torch
from tests._helpers import make_text

from layerwise.lab.cli import main
from layerwise.lab.downstream import (
    EVAL_FILE,
    EvalError,
    eval_markdown,
    eval_rows,
    evaluate,
    fingerprint,
    parse_tasks,
    require_lm_eval,
    task_entries,
    write_cloze_task,
)

# lm-eval is the optional `eval` extra (an external package): without it these tests skip
pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

EOS = "<|endoftext|>"
N_DOCS = 24


def build_hf_dir(path, train_text: str):
    """A tiny LlamaForCausalLM + a byte-level BPE trained here, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        train_text.splitlines(),
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: log-likelihoods that differ between choices
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_and_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    hf = build_hf_dir(root / "hf", make_text(600, seed=1))
    yaml, docs = write_cloze_task(make_text(80, seed=7), root / "tasks", n_docs=N_DOCS, version=2.0)
    return hf, yaml, docs


def hand_loglikelihoods(hf_dir, docs) -> list[list[float]]:
    """sum log p(" " + choice | context) per choice, with the model in float64 and the raw ``tokenizers`` file."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(hf_dir).double().eval()
    out = []
    for d in docs:
        ctx = tok.encode(d["context"]).ids
        row = []
        for c in d["choices"]:
            whole = tok.encode(d["context"] + " " + c).ids
            assert whole[: len(ctx)] == ctx  # the continuation's tokens start where the context's end
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0], -1)
            row.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        out.append(row)
    return out


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline mode for the HF libraries, a private datasets cache, and every socket connection attempt recorded
    and refused."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config  # read at its import: set here too, in case another test imported it first

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")  # not the user's cache
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network access attempted in an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_local_cloze_accuracy_equals_hand_loglikelihoods(hf_and_task, tmp_path, no_network):
    hf, yaml, docs = hf_and_task
    out = tmp_path / "res"
    assert (
        main(
            [
                "eval",
                str(hf),
                "--tasks",
                str(yaml),
                "--batch-size",
                "5",
                "--device",
                "cpu",
                "--log-samples",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert no_network == []
    data = json.loads((out / EVAL_FILE).read_text())
    e = data["tasks"]["lw_cloze"]
    assert e["version"] == 2.0 and e["n_samples"] == N_DOCS and e["limit"] is None
    assert data["lm_eval_version"] == importlib.metadata.version("lm_eval")

    hand = hand_loglikelihoods(hf, docs)
    samples = sorted(
        (json.loads(ln) for ln in (out / "eval_samples" / "lw_cloze.jsonl").read_text().splitlines()),
        key=lambda r: r["doc_id"],
    )
    assert len(samples) == N_DOCS
    for s, row in zip(samples, hand):
        got = [r[0] for r in s["filtered_resps"]]
        assert got == pytest.approx(row, abs=2e-4, rel=1e-5)
    spread = [max(r) - min(r) for r in hand]
    assert min(spread) > 1e-2  # the choices are told apart: the argmax below is not decided by rounding
    acc = sum(max(range(4), key=row.__getitem__) == d["label"] for row, d in zip(hand, docs)) / N_DOCS
    acc_norm = (
        sum(max(range(4), key=lambda i: row[i] / len(d["choices"][i])) == d["label"] for row, d in zip(hand, docs))
        / N_DOCS
    )
    assert e["metrics"]["acc"] == pytest.approx(acc, abs=1e-12)
    assert e["metrics"]["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    # lm-eval's s.e. of a mean of 0/1 scores: the sample standard deviation over sqrt(n)
    assert e["stderr"]["acc"] == pytest.approx(math.sqrt(acc * (1 - acc) / (N_DOCS - 1)), rel=1e-9)

    # --limit: the first 10 items; a second task call merges into the same eval.json, replacing the entry
    rep = evaluate(hf, [str(yaml)], limit=10, out=out, device="cpu", quiet=True)
    e10 = rep["tasks"]["lw_cloze"]
    assert e10["n_samples"] == 10 and e10["limit"] == 10 and e10["n_samples_total"] == N_DOCS
    acc10 = sum(max(range(4), key=row.__getitem__) == d["label"] for row, d in zip(hand[:10], docs[:10])) / 10
    assert e10["metrics"]["acc"] == pytest.approx(acc10, abs=1e-12)
    assert json.loads((out / EVAL_FILE).read_text())["tasks"]["lw_cloze"]["limit"] == 10
    assert no_network == []


def test_cloze_items_are_the_true_next_word_among_distinct_choices(tmp_path):
    text = make_text(50, seed=11)
    yaml, docs = write_cloze_task(text, tmp_path, n_docs=30, n_choices=3, seed=5, name="c3")
    lines = text.splitlines()
    assert len(docs) == 30 and "task: c3" in yaml.read_text()
    for d in docs:
        assert len(d["choices"]) == 3 == len(set(d["choices"]))
        answer = d["choices"][d["label"]]
        # the context is the start of some held-out line, and the answer is the word that follows it there
        assert any(ln.startswith(d["context"] + " " + answer + " ") for ln in lines)
    assert {d["label"] for d in docs} == {0, 1, 2}
    assert [json.loads(ln) for ln in (tmp_path / "c3.jsonl").read_text().splitlines()] == docs
    with pytest.raises(EvalError, match="fewer than 4 distinct lower-case words"):
        write_cloze_task("A b c. D e f\n", tmp_path)


def test_bad_input_gets_clear_errors(tmp_path, hf_and_task, monkeypatch, capsys):
    hf, yaml, _ = hf_and_task
    with pytest.raises(EvalError, match="--tasks is empty"):
        parse_tasks(" , ")
    with pytest.raises(EvalError, match="task file .*nope.yaml does not exist"):
        parse_tasks(str(tmp_path / "nope.yaml"))
    with pytest.raises(EvalError, match="--include-path .* does not exist"):
        parse_tasks("arc_easy", [tmp_path / "missing"])
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(EvalError, match="needs a top-level `task: NAME`"):
        parse_tasks(str(tmp_path / "bad.yaml"))
    assert parse_tasks(f"arc_easy,{yaml},arc_easy") == (["arc_easy", "lw_cloze"], [str(yaml.parent)])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty), "--tasks", str(yaml)]) == 2
    assert "neither a Hugging Face model folder" in capsys.readouterr().err
    with pytest.raises(EvalError, match="--limit must be > 0"):
        evaluate(hf, str(yaml), limit=0)
    with pytest.raises(EvalError, match="--batch-size must be"):
        evaluate(hf, str(yaml), batch_size="big")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    (run / "checkpoints").mkdir()
    with pytest.raises(EvalError, match="not finished"):
        evaluate(run, str(yaml))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the eval extra were not installed
    with pytest.raises(EvalError, match=r"pip install 'layerwise\[eval\]'"):
        require_lm_eval()


def test_task_entries_from_an_lm_eval_result():
    """Metric names with filters, lm-eval's 'N/A' s.e., groups with an aggregate vs tags without one."""
    res = {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.31, "acc_stderr,none": 0.004},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.28, "acc_stderr,none": 0.039},
            "arc_easy": {
                "alias": "arc_easy",
                "acc,none": 0.40,
                "acc_stderr,none": "N/A",
                "acc_norm,none": 0.38,
                "acc_norm_stderr,none": 0.01,
            },
            "gsm8k": {"exact_match,strict-match": 0.02, "exact_match_stderr,strict-match": 0.004},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy"], "ai2_arc": ["arc_easy"], "gsm8k": []},
        "versions": {"mmlu": 2, "mmlu_anatomy": 1.0, "arc_easy": 1.0, "gsm8k": 3.0},
        "n-shot": {"arc_easy": 0, "gsm8k": 5},
        "n-samples": {"arc_easy": {"original": 2376, "effective": 100}, "gsm8k": {"original": 1319, "effective": 100}},
    }
    e = task_entries(res, limit=100, num_fewshot=None, fp="x")
    assert set(e) == {"mmlu", "mmlu_anatomy", "arc_easy", "gsm8k"}
    assert e["mmlu_anatomy"]["subtask_of"] == "mmlu" and "subtask_of" not in e["arc_easy"]  # ai2_arc: a tag
    assert e["arc_easy"]["metrics"] == {"acc": 0.40, "acc_norm": 0.38}
    assert e["arc_easy"]["stderr"] == {"acc": None, "acc_norm": 0.01}
    assert e["arc_easy"]["n_samples"] == 100 and e["arc_easy"]["n_samples_total"] == 2376
    assert e["gsm8k"]["metrics"] == {"exact_match,strict-match": 0.02} and e["gsm8k"]["num_fewshot"] == 5
    assert e["gsm8k"]["stderr"] == {"exact_match,strict-match": 0.004} and e["mmlu"]["version"] == 2


def _fake_run(path, seed, evals: dict):
    path.mkdir(parents=True)
    (path / "config.toml").write_text("")
    (path / "summary.json").write_text(json.dumps({"seed": seed, "final_val_loss": 1.0}))
    fp = fingerprint(path)
    tasks = {
        t: {"version": 1, "metrics": m, "stderr": {k: 0.05 for k in m}, "fingerprint": fp, "limit": None}
        for t, m in evals.items()
    }
    (path / EVAL_FILE).write_text(json.dumps({"tasks": tasks}))


def test_report_columns_mean_se_and_paired_differences(tmp_path):
    accs = {"a": [0.25, 0.40, 0.30], "b": [0.35, 0.45, 0.30]}
    found = {}
    for m, xs in accs.items():
        for k, x in enumerate(xs):
            _fake_run(tmp_path / m / f"seed{k}", k, {"t": {"acc": x}})
            found.setdefault(m, {})[k] = tmp_path / m / f"seed{k}"
    # a member of a group gets no column of its own
    ev = json.loads((tmp_path / "a" / "seed0" / EVAL_FILE).read_text())
    ev["tasks"]["g_sub"] = dict(ev["tasks"]["t"], subtask_of="g")
    (tmp_path / "a" / "seed0" / EVAL_FILE).write_text(json.dumps(ev))
    # a stale entry: the run was trained further (summary.json rewritten) after it was evaluated
    (tmp_path / "b" / "seed2" / "summary.json").write_text(json.dumps({"seed": 2, "final_val_loss": 0.9}))
    warnings = []
    cols, stats = eval_rows(found, ["a", "b"], warn=warnings.append)
    assert cols == ["t/acc"]
    assert len(warnings) == 1 and "earlier state" in warnings[0] and "seed2" in warnings[0]
    a, b = stats["a"]["t/acc"], stats["b"]["t/acc"]
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.95 / 3)
    assert a["se"] == pytest.approx(
        math.sqrt(((0.25 - 0.95 / 3) ** 2 + (0.4 - 0.95 / 3) ** 2 + (0.3 - 0.95 / 3) ** 2) / 2 / 3)
    )
    assert b["n"] == 2 and b["mean"] == pytest.approx(0.40)
    assert b["paired"] == pytest.approx(0.075) and b["n_paired"] == 2  # (0.10 + 0.05) / 2 over seeds 0, 1
    assert b["paired_se"] == pytest.approx(0.025)  # stdev(0.10, 0.05) / sqrt(2)
    assert a["paired"] == 0.0 and a["item_se"] == pytest.approx(0.05)
    md = eval_markdown(cols, stats, ["a", "b"])
    assert "| t/acc | Δ vs a (paired) |" in md
    assert "| b | 0.4000 ± 0.0500 (n=2) | +0.0750 ± 0.0250 |" in md


def test_run_dir_without_export_gets_clear_error(tmp_path, hf_and_task, monkeypatch):
    _, yaml, _ = hf_and_task
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    (run / "config.toml").write_text("")
    (run / "summary.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "layerwise.lab.export", None)  # an installation without `layerwise export`
    with pytest.raises(EvalError, match="needs `layerwise export`"):
        evaluate(run, str(yaml))


def test_compare_eval_tasks_paired_columns(tmp_path, corpus_file, capsys, no_network):
    yaml, docs = write_cloze_task(make_text(60, seed=7), tmp_path / "tasks", n_docs=8, name="lw_cloze8")
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--preset",
        "smoke",
        "--methods",
        "adamw,multipliers",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--set",
        f"data.corpus={corpus_file}",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.progress=false",
        "--set",
        "train.tensorboard=false",
        "--eval-tasks",
        str(yaml),
        "--eval-device",
        "cpu",
    ]
    assert main(args) == 0
    assert no_network == []
    res = json.loads((out / "results.json").read_text())
    per_run = {
        m: [json.loads((out / m / f"seed{k}" / EVAL_FILE).read_text())["tasks"]["lw_cloze8"] for k in (0, 1)]
        for m in ("adamw", "multipliers")
    }
    assert all(e["n_samples"] == 8 for es in per_run.values() for e in es)
    rows = {r["method"]: r["eval"]["lw_cloze8/acc"] for r in res["rows"]}
    a = [e["metrics"]["acc"] for e in per_run["adamw"]]
    b = [e["metrics"]["acc"] for e in per_run["multipliers"]]
    assert rows["adamw"]["mean"] == pytest.approx((a[0] + a[1]) / 2)
    assert rows["adamw"]["se"] == pytest.approx(abs(a[0] - a[1]) / 2)
    assert rows["multipliers"]["paired"] == pytest.approx((b[0] - a[0] + b[1] - a[1]) / 2)
    assert rows["multipliers"]["paired_se"] == pytest.approx(abs((b[0] - a[0]) - (b[1] - a[1])) / 2)
    # the exported model of a run (multipliers merged) scores as the hand computation says
    hand = hand_loglikelihoods(out / "multipliers" / "seed1" / "hf-export", docs)
    acc = sum(max(range(4), key=row.__getitem__) == d["label"] for row, d in zip(hand, docs)) / len(docs)
    assert b[1] == pytest.approx(acc, abs=1e-12)
    md = (out / "results.md").read_text()
    assert "| lw_cloze8/acc | Δ vs adamw (paired) |" in md and "lw_cloze8/acc_norm" in md
    capsys.readouterr()
    assert main(args) == 0  # everything done: neither trained nor evaluated again
    assert capsys.readouterr().out.count("[skip] eval") == 4
