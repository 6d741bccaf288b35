"""Fault handling of runs (issue 19): safe DCP loading, the last finite checkpoint after a NaN, K checkpoints with
fallback, orphaned temp files, one writer per run directory, layout changes on resume, no duplicate logs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from tests._helpers import read_jsonl

from layerwise.lab import config as C
from layerwise.lab.checkpoint import CheckpointStore, trim_jsonl
from layerwise.lab.cli import main
from layerwise.lab.guard import NonFiniteGuard, NonFiniteLossError
from layerwise.lab.runlock import RunLock, RunLockedError
from layerwise.lab.train import train


def _cfg(corpus, **over):
    cfg = C.resolve(
        "smoke",
        None,
        [
            f"data.corpus={corpus}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.eval_every=0",
            "train.log_every=2",
            "train.max_steps=8",
        ],
    )
    return C.apply_overrides(cfg, over)


def _steps(path):
    return [r["step"] for r in read_jsonl(path)]


# ------------------------------------------------------------------ 1. no code execution from a DCP folder
class _Evil:
    """Pickles to a call that creates ``marker`` when unpickled with plain pickle / weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _dcp_folder(path, marker, evil_metadata=True, evil_entry=False):
    """A real DCP folder (torch's writer, one process) plus extra.pt; optionally with a crafted .metadata or a
    crafted non-tensor entry."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {"layers.0.w": torch.randn(4, 4)}, "optimizer": {"state": {}, "param_groups": []}}
    if evil_entry:
        state["payload"] = _Evil(marker)
    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    torch.save(
        {"step": 4, "tokens": 0, "wall_s": 0.0, "parallel": "fsdp", "world_size": 1, "scheduler": {}, "decay": None},
        path / "extra.pt",
    )
    if evil_metadata:
        (path / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    return path


def test_crafted_dcp_metadata_runs_no_code_in_analyze_and_resume(tmp_path, corpus_file, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    _dcp_folder(run / "checkpoints" / "last.dcp", marker)
    # the file really is an attack: torch's own reader runs it
    from torch.distributed.checkpoint import FileSystemReader

    control = tmp_path / "control"
    ctl = _dcp_folder(tmp_path / "ctl.dcp", control)
    with pytest.raises(AttributeError):  # exec ran, returned None, and torch then trips over it
        FileSystemReader(str(ctl)).read_metadata()
    assert control.read_text() == "pwned"

    # layerwise analyze RUN_DIR (checkpoints/last.dcp) and analyze DCP_DIR
    assert main(["analyze", str(run), "--no-plots"]) == 2
    assert "refusing to load builtins.exec" in capsys.readouterr().err
    assert main(["analyze", str(run / "checkpoints" / "last.dcp"), "--no-plots"]) == 2
    assert "refusing to load builtins.exec" in capsys.readouterr().err
    # train --resume of an FSDP run (a one-process group here)
    cfg = _cfg(corpus_file, **{"train.parallel": "fsdp"})
    (run / "config.toml").write_text(C.to_toml(cfg))
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert "refusing to load builtins.exec" in err and "Traceback" not in err
    assert not marker.exists()


def test_crafted_non_tensor_dcp_entry_runs_no_code(tmp_path):
    from layerwise.lab.safeload import UnsafeCheckpointError, load_dcp_full

    marker = tmp_path / "pwned"
    path = _dcp_folder(tmp_path / "x.dcp", marker, evil_metadata=False, evil_entry=True)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        load_dcp_full(path)
    assert not marker.exists()


def test_safe_reader_reads_real_dcp_like_torch(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from layerwise.lab.safeload import load_dcp_full

    path = _dcp_folder(tmp_path / "ok.dcp", tmp_path / "m", evil_metadata=False)
    dcp_to_torch_save(str(path), str(tmp_path / "ref.pt"))
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    ours = load_dcp_full(path)
    torch.testing.assert_close(ours["model"]["layers.0.w"], ref["model"]["layers.0.w"], rtol=0, atol=0)
    assert ours["optimizer"] == ref["optimizer"]


# ------------------------------------------------------------------ 2. non-finite: the kept checkpoint is finite
def test_nan_run_keeps_last_finite_checkpoint_and_resumes_with_lower_lr(tmp_path, corpus_file):
    run = tmp_path / "r"
    train(_cfg(corpus_file, **{"train.stop_at": 4, "train.ckpt_every": 1}), run, quiet=True)
    # the settings: huge lr, no clipping, a checkpoint every step
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at step (\d+).*kept at .*last\.pt \(step \d+\)"):
        train(
            _cfg(
                corpus_file,
                **{"train.ckpt_every": 1, "optim.lr": 1e6, "optim.grad_clip": 0.0, "optim.warmup_frac": 0.0},
            ),
            run,
            resume=True,
            quiet=True,
            allow_changes=True,
        )
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] >= 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    opt_tensors = [v for s in ck["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert opt_tensors and all(torch.isfinite(v).all() for v in opt_tensors)
    assert not (run / "checkpoints" / ".pending.pt").exists()
    summary = train(
        _cfg(corpus_file, **{"train.ckpt_every": 1, "optim.lr": 3e-3}), run, resume=True, quiet=True, allow_changes=True
    )
    assert summary["steps"] == 8 and summary["final_val_loss"] == summary["final_val_loss"]  # finite, not NaN
    assert _steps(run / "metrics.jsonl") == [2, 4, 6, 8]


def test_lagged_guard_flags_without_sync_and_reports_the_first_bad_step():
    g = NonFiniteGuard("cpu", eager=False, where=lambda: "kept at X")
    g.before_step(1, torch.tensor(2.0), torch.tensor(1.0), [])
    g.verify()
    g.before_step(2, torch.tensor(float("nan")), torch.tensor(1.0), [])  # not raised here: no host sync
    g.before_step(3, torch.tensor(2.0), torch.tensor(float("inf")), [])
    with pytest.raises(NonFiniteLossError, match="at step 2;.*kept at X"):
        g.verify()
    g2 = NonFiniteGuard("cpu", eager=False)
    with pytest.raises(NonFiniteLossError, match="weights hold NaN"):
        g2.verify(params=[torch.tensor([1.0, float("nan")])])
    g3 = NonFiniteGuard("cpu", eager=True)  # eager: raised before the optimizer step
    with pytest.raises(NonFiniteLossError, match="gradients"):
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.tensor([0.0, float("inf")])
        g3.before_step(1, torch.tensor(1.0), None, [p])


# ------------------------------------------------------------------ 3. checkpoints: every N steps, K kept, fallback
def test_ckpt_every_keep_k_fallback_orphans_and_no_duplicate_logs(tmp_path, corpus_file, capsys):
    import layerwise.lab.train as T

    run = tmp_path / "r"
    over = {
        "train.ckpt_every": 3,
        "train.log_every": 10,
        "train.keep_checkpoints": 3,
        "train.tensorboard": True,
        "decay.name": "alphadecay",
        "decay.interval": 2,
        "train.max_steps": 10,
    }
    real_write = T.MetricsLog.write

    def write_then_crash(self, rec):  # a crash right after step 8's log line (checkpoint at 6)
        real_write(self, rec)
        if rec["step"] == 8:
            raise KeyboardInterrupt

    T.MetricsLog.write = write_then_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(corpus_file, **{**over, "train.log_every": 4}), run, quiet=True)
    finally:
        T.MetricsLog.write = real_write
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt", "step-00000003.pt"]  # ckpt_every off log steps
    assert torch.load(ck / "last.pt", weights_only=True)["step"] == 6
    assert _steps(run / "metrics.jsonl") == [4, 8]
    # the newest checkpoint gets corrupted and a crashed writer left a temp file
    (ck / "last.pt").write_bytes((ck / "last.pt").read_bytes()[:1000])
    (ck / ".last.pt.tmp99999").write_bytes(b"partial")
    with pytest.warns(
        RuntimeWarning,
        match=r"last\.pt: .*unreadable, resuming from the previous one "
        r"\(step-00000003\.pt, step 3\)",
    ):
        summary = train(
            _cfg(corpus_file, **{**over, "train.log_every": 4}), run, resume=True, quiet=True, allow_changes=True
        )
    assert summary["steps"] == 10
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["last.pt", "last.pt.corrupt", "step-00000006.pt", "step-00000009.pt"]
    assert torch.load(ck / "last.pt", weights_only=True)["step"] == 10
    # metrics, spectral.jsonl and TensorBoard continue from step 3 without duplicates
    assert _steps(run / "metrics.jsonl") == [4, 8, 10]
    spec = _steps(run / "spectral.jsonl")
    assert spec == sorted(set(spec)) and spec[0] == 0 and spec[-1] == 10
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [4, 8, 10]
    # every checkpoint unreadable: a clear error, no traceback
    for p in ck.glob("*.pt"):
        p.write_bytes(b"garbage")
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=12"]) == 1
    err = capsys.readouterr().err
    assert "no readable checkpoint to resume from" in err and "Traceback" not in err


def test_trim_jsonl_drops_later_steps_and_a_torn_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert trim_jsonl(p, 2) == 2
    assert _steps(p) == [1, 2]


def test_store_keeps_k_and_drops_a_previous_runs_files(tmp_path):
    from layerwise.lab.train import atomic_torch_save

    d = tmp_path / "ck"
    d.mkdir()
    torch.save({"step": 500}, d / "step-00000500.pt")  # left by an earlier run in this directory
    store = CheckpointStore(d, keep=2)
    for step in (1, 2, 3):
        store.save_pt({"step": step}, atomic_torch_save)
    assert sorted(p.name for p in d.iterdir()) == ["last.pt", "step-00000002.pt"]
    assert [torch.load(p, weights_only=True)["step"] for p in (d / "last.pt", d / "step-00000002.pt")] == [3, 2]


# ------------------------------------------------------------------ 4. one writer per run directory
def test_second_writer_fails_at_once_naming_the_first(tmp_path, corpus_file, capsys):
    run = tmp_path / "r"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from layerwise.lab.runlock import RunLock
            RunLock({str(run)!r}).acquire()
            print("locked", flush=True)
            time.sleep(120)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [
            "train",
            "--preset",
            "smoke",
            "--set",
            f"data.corpus={corpus_file}",
            "--set",
            "train.progress=false",
            "--out",
            str(run),
        ]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"in use by another layerwise process: pid {holder.pid}" in err
        assert not (run / "config.toml").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and taken over, with a note
    with pytest.warns(RuntimeWarning, match=f"stale lock .*pid {holder.pid}"):
        train(_cfg(corpus_file, **{"train.max_steps": 2}), run, quiet=True)
    assert (run / "summary.json").exists() and not (run / ".lock").exists()


def test_lock_is_exclusive_within_a_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: can be taken again
        pass


# ------------------------------------------------------------------ 5. a changed layout on resume is refused
def test_resume_with_changed_parallel_is_refused_saying_what_differs(tmp_path, corpus_file, capsys):
    run = tmp_path / "r"
    train(_cfg(corpus_file, **{"train.max_steps": 2}), run, quiet=True)
    before = (run / "config.toml").read_text()
    assert main(["train", "--resume", str(run), "--set", "train.parallel=fsdp", "--set", "train.max_steps=4"]) == 1
    err = capsys.readouterr().err
    assert "written with train.parallel=none or ddp" in err and "train.parallel='fsdp'" in err
    assert (run / "config.toml").read_text() == before and _steps(run / "metrics.jsonl") == [2]
    # the reverse: an FSDP run's DCP folder, resumed with ddp
    run2 = tmp_path / "r2"
    _dcp_folder(run2 / "checkpoints" / "last.dcp", tmp_path / "m", evil_metadata=False)
    (run2 / "config.toml").write_text(C.to_toml(_cfg(corpus_file, **{"train.parallel": "fsdp"})))
    assert main(["train", "--resume", str(run2), "--set", "train.parallel=ddp"]) == 1
    err = capsys.readouterr().err
    assert "written with train.parallel=fsdp" in err and "--set train.parallel=fsdp" in err


def test_fsdp_dcp_rotation_pending_and_fallback_in_one_process(tmp_path, corpus_file):
    """FSDP (a one-process group): DCP folders rotate like .pt files; a corrupt newest one falls back."""
    run = tmp_path / "f"
    over = {"train.parallel": "fsdp", "train.ckpt_every": 2, "train.max_steps": 6, "train.log_every": 3}
    train(_cfg(corpus_file, **over), run, quiet=True)
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.dcp", "step-00000004.dcp"]
    assert torch.load(ck / "last.dcp" / "extra.pt", weights_only=True)["step"] == 6
    (ck / "last.dcp" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.warns(RuntimeWarning, match=r"last\.dcp: .*unreadable, resuming from the previous one"):
        summary = train(
            _cfg(corpus_file, **{**over, "train.max_steps": 8}), run, resume=True, quiet=True, allow_changes=True
        )
    assert summary["steps"] == 8
    assert sorted(p.name for p in ck.iterdir()) == ["last.dcp", "last.dcp.corrupt", "step-00000006.dcp"]
    assert _steps(run / "metrics.jsonl") == [3, 6, 8]
