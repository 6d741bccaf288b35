"""Run identity: a result is only ever reported under the config and data that produced it; resume integrity;
honest reports (n/a over one seed, experiments kept apart, unknown --ref); tokens_per_s; Ctrl-C."""

import json
import math
import re
import signal

import pytest
from tests._helpers import read_jsonl

from layerwise.lab import runid
from layerwise.lab import train as T
from layerwise.lab.cli import main
from layerwise.lab.config import resolve
from layerwise.lab.report import find_runs
from layerwise.lab.stats import fmt_pm, json_safe, mean_se

FAST = ["--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.eval_every=0"]


def _smoke(corpus, *extra):
    return ["--preset", "smoke", "--set", f"data.corpus={corpus}", *FAST, "--set", "train.max_steps=4", *extra]


def _loss(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["final_val_loss"]


# --------------------------------------------------------------------------------------------- compare
def test_compare_refuses_stale_runs_and_overwrite_reruns_them(tmp_path, corpus_file, capsys):
    out = tmp_path / "cmpA"
    base = ["compare", "--methods", "adamw", "--seeds", "1", "--out", str(out), *_smoke(corpus_file)]
    assert main(base) == 0
    first = _loss(out / "adamw/seed0")
    capsys.readouterr()
    new_lr = [*base, "--set", "optim.lr=1e-4"]
    assert main(new_lr) == 2  # the issue's repro: must not print the old model's loss under the new lr
    err = capsys.readouterr().err
    assert "optim.lr: 0.003 -> 0.0001" in err and "--overwrite" in err
    assert _loss(out / "adamw/seed0") == first  # untouched
    assert main([*new_lr, "--overwrite"]) == 0
    rerun = _loss(out / "adamw/seed0")
    assert rerun != pytest.approx(first, abs=1e-3)
    fresh = tmp_path / "fresh"  # the overwritten run equals a run of the new config in a new folder
    assert main(["train", *_smoke(corpus_file), "--set", "optim.lr=1e-4", "--out", str(fresh)]) == 0
    assert rerun == pytest.approx(_loss(fresh), rel=1e-5)
    assert json.loads((out / "results.json").read_text())["rows"][0]["val_loss"] == pytest.approx(rerun)
    capsys.readouterr()
    # a neutral key (thread count, logging) does not make a run stale: it is reused
    assert main([*new_lr, "--set", "train.log_every=1", "--set", "train.num_threads=1"]) == 0
    assert "[skip] adamw seed 0" in capsys.readouterr().out


def test_identity_records_absolute_corpus_and_data_checksums(tmp_path, corpus_file, monkeypatch):
    monkeypatch.chdir(corpus_file.parent)
    run = tmp_path / "r"
    assert (
        main(
            [
                "train",
                "--preset",
                "smoke",
                "--set",
                f"data.corpus={corpus_file.name}",
                *FAST,
                "--set",
                "train.max_steps=2",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert f'corpus = "{corpus_file.resolve()}"' in (run / "config.toml").read_text()
    ident = json.loads((run / "identity.json").read_text())
    meta = json.loads((run / "summary.json").read_text())["data_dir"]
    files = json.loads(open(f"{meta}/meta.json").read())["files"]
    assert ident["data"] == {k: v["sha256"] for k, v in files.items()}
    assert "train.progress" not in ident["config"] and ident["config"]["optim.lr"] == 3e-3


# ---------------------------------------------------------------------------------------------- train
def test_train_out_refuses_existing_run_unless_overwrite(tmp_path, corpus_file, capsys):
    run = tmp_path / "r"
    args = ["train", *_smoke(corpus_file), "--out", str(run)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    (run / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite", "--set", "train.max_steps=3"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_resume_refuses_changed_corpus_naming_it(tmp_path, corpus_file, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text(corpus_file.read_text())
    run = tmp_path / "r"
    assert (
        main(["train", *_smoke(corpus), "--set", "train.max_steps=6", "--set", "train.stop_at=3", "--out", str(run)])
        == 0
    )
    corpus.write_text(corpus_file.read_text()[: len(corpus_file.read_text()) // 2])  # the corpus changes
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(corpus) in err and "tokenizer.json" in err
    assert re.search(r"train\S*\.bin", err), err  # a changed token shard is named
    assert not (run / "summary.json").exists()


def test_resume_config_changes_need_the_flag_and_are_recorded(tmp_path, corpus_file, capsys):
    run = tmp_path / "r"
    assert (
        main(
            [
                "train",
                *_smoke(corpus_file),
                "--set",
                "train.max_steps=8",
                "--set",
                "train.stop_at=4",
                "--set",
                "optim.warmup_frac=0.0",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=16"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps: 8 -> 16" in err and "--allow-changes" in err
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=2"]) == 2  # ends before the checkpoint
    assert "checkpoint is at step 4" in capsys.readouterr().err
    # another model is refused even with the flag (by the checkpoint loader, which runs first)
    assert main(["train", "--resume", str(run), "--set", "model.size=tiny", "--allow-changes"]) in (1, 2)
    assert "model" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=16", "--allow-changes"]) == 0
    out = capsys.readouterr().out
    # cosine at step 4 of 8 (no warm-up): 3e-3 * (0.1 + 0.9 * 0.5 * (1 + cos(pi/2))); of 16: cos(pi/4)
    old = 3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 8)))
    new = 3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 16)))
    assert f"learning rate {old:.3g} -> {new:.3g}" in out
    ident = json.loads((run / "identity.json").read_text())
    assert ident["changes"] == [{"step": 4, "changed": ["train.max_steps: 8 -> 16"]}]
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert lrs[5] == pytest.approx(3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 16))))  # lr of step index 4
    # such a run no longer stands for any single config
    assert any("resumed at step 4" in d for d in runid.differences(ident, ident | {"changes": []}))


def test_resume_without_checkpoint_says_it_starts_fresh(tmp_path, corpus_file, capsys):
    from layerwise.lab.config import to_toml

    run = tmp_path / "r"
    run.mkdir()
    cfg = resolve(
        "smoke",
        None,
        [f"data.corpus={corpus_file}", "train.max_steps=2", "train.progress=false", "train.tensorboard=false"],
    )
    (run / "config.toml").write_text(to_toml(cfg))
    with pytest.warns(RuntimeWarning, match="no checkpoint in .*; starting from step 0"):
        assert main(["train", "--resume", str(run)]) == 0


# --------------------------------------------------------------------------------------------- report
def test_report_keeps_experiments_apart_and_rejects_unknown_ref(tmp_path, corpus_file, capsys):
    a, b = tmp_path / "cmpA", tmp_path / "cmpB"
    for out, steps in ((a, 4), (b, 3)):  # two experiments in compare's layout, both with a method "adamw"
        assert (
            main(
                [
                    "train",
                    *_smoke(corpus_file),
                    "--set",
                    f"train.max_steps={steps}",
                    "--out",
                    str(out / "adamw" / "seed0"),
                ]
            )
            == 0
        )
    found = find_runs([a, b])
    assert sorted(found) == ["cmpA/adamw", "cmpB/adamw"]
    rep = tmp_path / "rep"
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--out", str(rep), "--ref", "cmpA/adamw"]) == 0
    md = (rep / "results.md").read_text()
    assert "| cmpA/adamw | 1 |" in md and "(reference)" in md
    assert "no seed of equal length" in md  # 4 vs 3 steps: not paired
    assert "± n/a" in md and "± 0.0000" not in md
    assert main(["report", str(a), "--ref", "nosuch"]) == 2
    assert "--ref 'nosuch' is not among the methods found: adamw" in capsys.readouterr().err


def test_stats_helpers():
    assert math.isnan(mean_se([2.0])[1]) and mean_se([1.0, 3.0]) == (2.0, 1.0)
    assert math.isnan(mean_se([1.0, float("inf")])[1])
    assert fmt_pm(5.2, float("nan")) == "5.2000 ± n/a" and fmt_pm(-0.1, 0.02, 2, True) == "-0.10 ± 0.02"
    assert json_safe({"a": [1.0, float("nan")], "b": (float("inf"),)}) == {"a": [1.0, None], "b": [None]}


# -------------------------------------------------------------------------------- throughput, checkpoints
def test_tokens_per_s_excludes_evaluation_once_and_time_based_checkpoints(tmp_path, corpus_file, monkeypatch):
    """A fake clock: each training batch takes 1 s, each evaluation 1000 s.  Every logged tokens_per_s is then
    exactly tokens-per-step per second (the bug subtracted the evaluation twice: ~1e11 after each eval)."""
    from layerwise.lab.data import BatchSampler

    clock = [0.0]
    real_get, real_eval = BatchSampler.get, T.evaluate

    def get(self, *a, **k):
        clock[0] += 1.0
        return real_get(self, *a, **k)

    def evaluate(*a, **k):
        clock[0] += 1000.0
        return real_eval(*a, **k)

    saves = []
    real_save = T.atomic_torch_save
    monkeypatch.setattr(BatchSampler, "get", get)
    monkeypatch.setattr(T, "evaluate", evaluate)
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(T, "atomic_torch_save", lambda obj, path: (saves.append(obj.get("step")), real_save(obj, path)))
    cfg = resolve(
        "smoke",
        None,
        [
            f"data.corpus={corpus_file}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.max_steps=8",
            "train.log_every=2",
            "train.eval_every=4",
            f"train.ckpt_minutes={1.5 / 60}",
        ],
    )
    T.train(cfg, tmp_path / "r", quiet=True)
    recs = read_jsonl(tmp_path / "r/metrics.jsonl")
    per_step = cfg.train.batch_size * cfg.data.seq_len
    assert [r["step"] for r in recs] == [2, 4, 6, 8]
    assert [r["tokens_per_s"] for r in recs] == [pytest.approx(per_step)] * 4
    # 1.5 s cadence: steps 2 (2 s since start) and 6 (2 s since the evaluation's save) besides the evaluations
    assert [s for s in saves if s is not None] == [2, 4, 6, 8]


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_checkpoints_the_step_and_prints_the_resume_command(tmp_path, corpus_file, monkeypatch, capsys):
    from layerwise.lab.data import BatchSampler

    real_get = BatchSampler.get

    def get(self, step, *a, **k):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while step 3 (index 2) is being trained
        return real_get(self, step, *a, **k)

    monkeypatch.setattr(BatchSampler, "get", get)
    run = tmp_path / "r"
    rc = main(["train", *_smoke(corpus_file), "--set", "train.max_steps=6", "--out", str(run)])
    captured = capsys.readouterr()
    assert rc == 130 and "Traceback" not in captured.err
    assert f"layerwise train --resume {run}" in captured.err
    assert T.load_checkpoint(run / "checkpoints/last.pt")["step"] == 3  # nothing lost
    monkeypatch.setattr(BatchSampler, "get", real_get)
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_every_cli_option_has_help_and_compare_lists_the_methods(capsys):
    import argparse

    from layerwise.lab.cli import build_parser
    from layerwise.lab.methods import METHODS

    missing = []

    def walk(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for n, sp in a.choices.items():
                    walk(sp, f"{name} {n}")
            elif not a.help and not isinstance(a, argparse._HelpAction):
                missing.append(f"{name} {a.option_strings or a.dest}")

    walk(build_parser(), "layerwise")
    assert missing == []
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert all(f"  {name} " in text for name in METHODS)


def test_a_finished_run_of_a_relative_width_method_is_reused(tmp_path, corpus_file):
    """``scaling`` sets model.base_hidden_size=-4 (a quarter of the width), resolved inside the run: the
    planner resolves it the same way, so the finished run is recognised as this config's."""
    from layerwise.lab.experiments import _DataCache, method_config, plan

    base = resolve(
        "smoke",
        None,
        [
            f"data.corpus={corpus_file}",
            "train.max_steps=2",
            "train.progress=false",
            "train.tensorboard=false",
            "train.eval_every=0",
        ],
    )
    cfg = method_config(base, "scaling", 0)
    run = tmp_path / "scaling" / "seed0"
    T.train(cfg.copy(), run, quiet=True)
    assert json.loads((run / "identity.json").read_text())["config"]["model.base_hidden_size"] > 0
    assert plan([("scaling", 0, cfg, run)], _DataCache(False), False, what="t", quiet=True) == []
    other = method_config(base, "scaling[optim.wd_exponent=1.0]", 0)
    with pytest.raises(runid.RunDirError, match=r"optim.wd_exponent: 0.5 -> 1.0"):
        plan([("scaling", 0, other, run)], _DataCache(False), False, what="t", quiet=True)
