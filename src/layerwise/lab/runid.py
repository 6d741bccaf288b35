"""Run identity: which config and which data produced the numbers in a run directory.

Every run directory holds ``identity.json``, written (atomically) when the run starts:

* ``config`` — the fully resolved config, flattened to ``section.key``, **minus the keys that cannot change
  a single number the run trains** (:data:`NEUTRAL_KEYS`: progress bars, TensorBoard, thread count, logging,
  evaluation and checkpoint cadence, ``stop_at``);  ``config_sha`` is its SHA-256;
* ``data`` — the SHA-256 of every file of the token cache entry (tokenizer and token shards, from the entry's
  verified ``meta.json``) and ``data_sha`` over them, plus the corpus path (absolute) for messages;
* ``changes`` — every config change accepted on a resume (``train --resume --allow-changes``), with the
  step at which it took effect.

``compare`` and ``sweep`` reuse a finished run only when its identity equals the one the current command
would produce (:func:`differences` is empty) and resume an interrupted one only then; otherwise they refuse
and name what differs (``--overwrite`` re-runs).  ``train`` refuses to start over a directory that already
holds a run unless told to resume or overwrite, and a resume refuses changed data outright and changed
config unless allowed (:func:`check_resume`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from layerwise.lab.config import Config, ConfigError

IDENTITY_FILE = "identity.json"
FORMAT = 1

#: Keys that change how a run is watched or how often it is saved, never what it computes.  ``num_threads``
#: and ``compile`` only change float rounding order (as two identical CPU runs do: see DESIGN.md), and
#: ``compare --jobs`` sets the thread count itself, so they are neutral too.
NEUTRAL_KEYS = frozenset(
    {
        "train.progress",
        "train.tensorboard",
        "train.num_threads",
        "train.compile",
        "train.stop_at",
        "train.log_every",
        "train.eval_every",
        "train.ckpt_every",
        "train.ckpt_minutes",
        "train.diagnostics_every",
        "train.spectral_every",
        "train.export_merged",
    }
)
#: Keys a resume may never change: they define the model, the batches or the data (a checkpoint of another
#: model cannot be loaded; other batches or data make a different run).  ``train.parallel`` is checked by
#: the checkpoint loader.
STRUCTURAL_PREFIXES = (
    "model.",
    "data.",
    "multipliers.kind",
    "multipliers.placement",
    "train.seed",
    "train.batch_size",
    "train.grad_accum",
    "train.device",
    "optim.name",
    "decay.name",
)
RESUME_UNCHECKED = frozenset({"train.parallel"})
#: Names of data.corpus / data.valid that are not paths.
_NOT_PATHS = ("", "shakespeare")
#: What a run directory holds once a run has started in it.
RUN_FILES = (
    "identity.json",
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "spectral.jsonl",
    "checkpoints",
    "tb",
    "plots",
    "tokenizer.json",
    "tokenizer_info.json",
)


class RunDirError(ConfigError):
    """A run directory holds a run that the requested command would contradict; the message says why."""


# ------------------------------------------------------------------------------------------- identity
def absolute_paths(cfg: Config) -> Config:
    """Make ``data.corpus`` / ``data.valid`` (and ``model.hf_config`` / ``model.init_from``) absolute when they
    name an existing local path (in place), so a run's config.toml means the same file from any directory."""
    for section, key in (("data", "corpus"), ("data", "valid"), ("model", "hf_config"), ("model", "init_from")):
        sec = getattr(cfg, section)
        v = getattr(sec, key, None)
        if isinstance(v, str) and v not in _NOT_PATHS and "://" not in v:
            p = Path(v).expanduser()
            if p.exists():
                setattr(sec, key, str(p.resolve()))
    return cfg


def config_items(cfg: Config | dict) -> dict[str, Any]:
    """The result-relevant config as ``{"section.key": value}`` (:data:`NEUTRAL_KEYS` left out)."""
    d = cfg.to_dict() if isinstance(cfg, Config) else cfg
    return {f"{s}.{k}": v for s, vals in d.items() for k, v in vals.items() if f"{s}.{k}" not in NEUTRAL_KEYS}


def data_items(data) -> dict[str, str]:
    """``{file name: sha256}`` of a token cache entry (a :class:`~layerwise.lab.data.TokenData`)."""
    files = (getattr(data, "meta", None) or {}).get("files")
    if not files:
        raise ConfigError(f"data cache entry {getattr(data, 'dir', '?')} has no file checksums in meta.json")
    return {name: rec["sha256"] for name, rec in sorted(files.items())}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def identity(cfg: Config, data) -> dict:
    """The identity of a run of ``cfg`` (already resolved: relative widths, absolute paths) on ``data``."""
    conf, files = config_items(cfg), data_items(data)
    return {
        "format": FORMAT,
        "config_sha": _sha(conf),
        "data_sha": _sha(files),
        "config": conf,
        "data": files,
        "corpus": cfg.data.corpus,
        "valid": cfg.data.valid,
        "data_dir": str(data.dir),
        "changes": [],
    }


def read(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / IDENTITY_FILE
    if not path.exists():
        return None
    try:
        ident = json.loads(path.read_text())
        if not isinstance(ident, dict) or "config" not in ident or "data" not in ident:
            raise ValueError("missing 'config' or 'data'")
        return ident
    except (ValueError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is unreadable ({e}); move the run away or pass --overwrite") from None


def write(run_dir: str | Path, ident: dict) -> None:
    path = Path(run_dir) / IDENTITY_FILE
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(ident, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    return "(absent)" if v is _ABSENT else repr(v)


_ABSENT = object()


def config_differences(old: dict, new: dict) -> list[str]:
    """``["optim.lr: 0.003 -> 0.0001", ...]`` between two :func:`config_items` dicts."""
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {_fmt(old.get(k, _ABSENT))} -> {_fmt(new.get(k, _ABSENT))}"
        for k in keys
        if old.get(k, _ABSENT) != new.get(k, _ABSENT)
    ]


def data_differences(old: dict, new: dict) -> list[str]:
    """What changed in the data between two identities (naming the corpus and the changed files)."""
    out = []
    if old.get("data") != new.get("data"):
        changed = sorted(f for f in set(old["data"]) | set(new["data"]) if old["data"].get(f) != new["data"].get(f))
        src = new.get("corpus") or old.get("corpus")
        what = ", ".join(changed)
        out.append(
            f"data: the token cache of corpus {src!r} differs from the one this run was trained on "
            f"({what} changed: {old.get('data_dir', '?')} -> {new.get('data_dir', '?')}); "
            "the corpus file or the tokenizer changed since"
        )
    return out


def differences(old: dict | None, new: dict) -> list[str]:
    """Everything that keeps the run with identity ``old`` from standing for a fresh run with ``new``."""
    if old is None:
        return ["the run has no identity.json (made by an older layerwise, or not by layerwise train)"]
    out = data_differences(old, new) + config_differences(old.get("config", {}), new["config"])
    for ch in old.get("changes") or []:
        out.append(
            f"it was resumed at step {ch.get('step')} with a changed config "
            f"({'; '.join(ch.get('changed', []))}), so no single config produced it"
        )
    return out


# ------------------------------------------------------------------------------------------- run dirs
def has_run(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds any file of a run (see :data:`RUN_FILES`)."""
    run_dir = Path(run_dir)
    return any((run_dir / f).exists() for f in RUN_FILES)


def clear(run_dir: str | Path) -> None:
    """Delete a run's files (only those :data:`RUN_FILES` names; anything else in the folder stays)."""
    run_dir = Path(run_dir)
    for f in RUN_FILES:
        p = run_dir / f
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def is_structural(key: str) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in STRUCTURAL_PREFIXES)


def check_fresh(run_dir: Path, overwrite: bool) -> None:
    """Before a fresh run in ``run_dir``: refuse if it already holds a run, unless ``overwrite`` (then clear)."""
    if not has_run(run_dir):
        return
    if not overwrite:
        old = read(run_dir) if (run_dir / IDENTITY_FILE).exists() else None
        what = "a finished run" if (run_dir / "summary.json").exists() else "a run"
        raise RunDirError(
            f"{run_dir} already holds {what}"
            + (f" (config {old['config_sha'][:12]})" if old else "")
            + f"; continue it with `layerwise train --resume {run_dir}`, or pass --overwrite to "
            "replace it, or choose another --out"
        )
    clear(run_dir)


def check_resume(run_dir: Path, new: dict, ckpt_step: int, allow_changes: bool) -> tuple[dict, list[str]]:
    """Check a resume from a checkpoint at ``ckpt_step`` against the run's recorded identity.

    Returns ``(identity to record, accepted changes)``.  Changed data is always refused (naming the corpus
    and the changed files); structural keys (model, data, seed, batch, optimizer and controller names) are
    always refused; any other result-relevant change needs ``allow_changes`` and is recorded in the
    identity's ``changes``.  A ``train.max_steps`` below the checkpoint's step is refused.
    """
    old = read(run_dir)
    if old is None:
        raise RunDirError(
            f"{run_dir} has a checkpoint but no {IDENTITY_FILE} (an older layerwise made it), so "
            "its data and config cannot be checked; pass --overwrite to start it afresh"
        )
    bad = data_differences(old, new)
    if bad:
        raise RunDirError(f"cannot resume {run_dir}: " + "; ".join(bad))
    max_steps = new["config"].get("train.max_steps")
    if isinstance(max_steps, int) and max_steps < ckpt_step:
        raise RunDirError(
            f"cannot resume {run_dir}: its checkpoint is at step {ckpt_step} but train.max_steps="
            f"{max_steps} ends before it"
        )
    changed = [
        k
        for k in sorted(set(old["config"]) | set(new["config"]))
        if k not in RESUME_UNCHECKED and old["config"].get(k, _ABSENT) != new["config"].get(k, _ABSENT)
    ]
    if not changed:
        return {**new, "changes": old.get("changes") or []}, []
    lines = [f"{k}: {_fmt(old['config'].get(k, _ABSENT))} -> {_fmt(new['config'].get(k, _ABSENT))}" for k in changed]
    structural = [ln for k, ln in zip(changed, lines) if is_structural(k)]
    if structural:
        raise RunDirError(
            f"cannot resume {run_dir} with a different model, data, seed or batch: "
            + "; ".join(structural)
            + " (start a new run with another --out)"
        )
    if not allow_changes:
        raise RunDirError(
            f"resuming {run_dir} would change its config: "
            + "; ".join(lines)
            + ". Pass --allow-changes to continue with these values (the change is recorded in "
            f"{IDENTITY_FILE}, and compare/sweep then no longer reuse the run)"
        )
    record = {**new, "changes": [*(old.get("changes") or []), {"step": ckpt_step, "changed": lines}]}
    return record, lines
