"""``layerwise eval``: downstream evaluation with EleutherAI's lm-evaluation-harness (the ``lm-eval`` package).

PATH is a Hugging Face model folder (``config.json`` + weights + tokenizer files) or a finished layerwise run
directory; a run is first exported to an HF folder inside itself (``RUN_DIR/hf-export/``, by
:func:`layerwise.lab.export.export_run`, reused while the run's checkpoint is unchanged).  The folder is then
evaluated by ``lm_eval.simple_evaluate`` with lm-eval's own ``hf`` model class, so every task definition, prompt
and metric is lm-eval's, not ours.

Results go to ``eval.json`` beside the model (``RUN_DIR/eval.json`` for a run; ``--out`` elsewhere).  It keeps
one entry per task, merged over calls, each with the task version, the metric values, **lm-eval's own standard
error** of each metric (over the task's items), the number of items, ``limit`` / ``num_fewshot``, and the
fingerprint of the run state it was computed on (``summary.json``'s hash): ``report`` ignores, with a warning,
an entry computed on an earlier state of a run that has since been trained further.

Tasks are lm-eval task or group names (``hellaswag,arc_easy``), names of tasks in ``--include-path`` folders,
or paths of task YAML files (their folder is added to the include path).  When every requested task is in the
include paths, lm-eval's built-in task index (thousands of YAML files, ~30 s to scan) is not loaded.

Nothing here touches the network by itself: a local model folder and a local task (a YAML whose
``dataset_path`` is ``json`` with local ``data_files``) run with ``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``.
Standard tasks download their datasets from the Hub the first time (see ``docs/eval.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "EvalError",
    "evaluate",
    "write_cloze_task",
    "evaluate_runs",
    "eval_rows",
    "eval_markdown",
    "register",
    "run",
    "resolve_model",
    "parse_tasks",
    "EVAL_FILE",
    "EXPORT_DIR",
]

EVAL_FILE = "eval.json"
EXPORT_DIR = "hf-export"
_EXPORT_STAMP = "layerwise-export.json"
_INSTALL_HINT = (
    "layerwise eval needs EleutherAI's lm-evaluation-harness, which is not installed here: "
    "pip install 'layerwise[eval]'  (or: pip install lm-eval)"
)


class EvalError(RuntimeError):
    """A model folder, run, task or option that ``layerwise eval`` cannot use."""


def require_lm_eval():
    """Import ``lm_eval`` or raise :class:`EvalError` saying how to install it."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise EvalError(f"{_INSTALL_HINT} ({e})") from e
    return lm_eval


# ------------------------------------------------------------------------------------------ model folders
def _weight_files(path: Path) -> list[Path]:
    pats = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")
    return sorted(f for p in pats for f in path.glob(p))


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(_weight_files(path))


def is_run_dir(path: Path) -> bool:
    return (path / "config.toml").is_file() and ((path / "summary.json").is_file() or (path / "checkpoints").is_dir())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(path: Path) -> str:
    """Identity of the model state behind ``path``: the hash of a run's ``summary.json`` (rewritten whenever the
    run finishes, so it changes when a run is trained further), or of an HF folder's config and weight stats."""
    path = Path(path)
    if is_run_dir(path) and (path / "summary.json").is_file():
        return "summary:" + _sha256((path / "summary.json").read_bytes())[:16]
    parts = [(path / "config.json").read_bytes()]
    for f in _weight_files(path):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "hf:" + _sha256(b"\0".join(parts))[:16]


def _checkpoint_stamp(run_dir: Path) -> dict:
    ckpt_dir = run_dir / "checkpoints"
    files = (
        [ckpt_dir / "last.pt"]
        if (ckpt_dir / "last.pt").is_file()
        else sorted(f for f in (ckpt_dir / "last.dcp").rglob("*") if f.is_file())
    )  # an FSDP run's sharded checkpoint
    if not files:
        raise EvalError(f"{run_dir}: no checkpoints/last.pt (or last.dcp/) to export")
    summary = run_dir / "summary.json"
    return {
        "checkpoint": [[str(f.relative_to(ckpt_dir)), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "summary_sha256": _sha256(summary.read_bytes()) if summary.is_file() else None,
    }


def export_for_eval(run_dir: Path, *, quiet: bool = False) -> Path:
    """The HF folder of a run, ``RUN_DIR/hf-export`` (by :func:`layerwise.lab.export.export_run`, which writes it
    under a temporary name and renames it), exported again only when the run's checkpoint has changed."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise EvalError(
            f"{run_dir}: the run is not finished (no summary.json); finish it with "
            f"`layerwise train --resume {run_dir}` before evaluating it"
        )
    stamp = _checkpoint_stamp(run_dir)
    dest = run_dir / EXPORT_DIR
    stamp_file = dest / _EXPORT_STAMP
    if stamp_file.is_file() and is_hf_dir(dest):
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return dest
        except json.JSONDecodeError:
            pass
    try:
        from layerwise.lab.export import export_run
    except ImportError as e:
        raise EvalError(
            f"{run_dir}: evaluating a run directory needs `layerwise export` "
            f"(layerwise.lab.export.export_run), which this installation lacks ({e}); export the run "
            "to a Hugging Face folder another way and pass that folder instead"
        ) from e
    if not quiet:
        print(f"[export] {run_dir} -> {dest}")
    got = Path(export_run(run_dir, dest))
    if not is_hf_dir(got):
        raise EvalError(f"{run_dir}: the export in {got} has no config.json + weights")
    # the stamp last: an export interrupted before this line is redone next time
    _write_json_atomic(got / _EXPORT_STAMP, stamp)
    return got


def resolve_model(path: str | Path, *, quiet: bool = False) -> tuple[Path, Path]:
    """(HF folder to evaluate, folder whose ``eval.json`` receives the results) for a RUN_DIR or HF_DIR."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path} does not exist")
    if is_hf_dir(path):
        return path, path
    if is_run_dir(path):
        return export_for_eval(path, quiet=quiet), path
    raise EvalError(
        f"{path}: neither a Hugging Face model folder (config.json + model.safetensors or "
        "pytorch_model.bin) nor a layerwise run directory (config.toml + summary.json)"
    )


# ------------------------------------------------------------------------------------------ tasks
def _yaml_task_name(path: Path) -> str:
    text = path.read_text()
    m = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", text, re.M)
    if not m:
        raise EvalError(f"{path}: a task YAML needs a top-level `task: NAME` line")
    return m.group(1)


def parse_tasks(tasks: str | Iterable[str], include_path: Iterable[str | Path] = ()) -> tuple[list[str], list[str]]:
    """(task names, include paths) from ``--tasks`` (comma-separated names or YAML paths) and ``--include-path``."""
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    items = [t for t in items if t]
    if not items:
        raise EvalError("--tasks is empty: name at least one lm-eval task (e.g. --tasks arc_easy)")
    paths = []
    for p in include_path or ():
        if not Path(p).exists():
            raise EvalError(f"--include-path {p} does not exist")
        paths.append(str(Path(p).resolve()))
    names = []
    for t in items:
        if t.endswith((".yaml", ".yml")):
            p = Path(t)
            if not p.is_file():
                raise EvalError(f"task file {t} does not exist")
            names.append(_yaml_task_name(p))
            if str(p.parent.resolve()) not in paths:
                paths.append(str(p.parent.resolve()))
        else:
            names.append(t)
    return list(dict.fromkeys(names)), paths


_TM_CACHE: dict[tuple, Any] = {}


def task_manager(names: list[str], include_path: list[str]):
    """An lm-eval ``TaskManager`` that knows ``names``; lm-eval's built-in index is loaded only when needed."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    key = (tuple(include_path), tuple(names))
    if key in _TM_CACHE:
        return _TM_CACHE[key]
    tm = None
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            tm = local
    if tm is None:
        tm = TaskManager(include_path=include_path or None)
        unknown = [n for n in names if n not in tm.all_tasks]
        if unknown:
            raise EvalError(
                f"unknown lm-eval task(s): {', '.join(unknown)} (list them with `lm-eval ls tasks`; a "
                "local task needs --include-path DIR or a path to its YAML file)"
            )
    _TM_CACHE[key] = tm
    return tm


# ------------------------------------------------------------------------------------------ a local task
_CLOZE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
  description: {description}
"""


def write_cloze_task(
    text: str,
    folder: str | Path,
    *,
    n_docs: int = 500,
    name: str = "lw_cloze",
    n_choices: int = 4,
    seed: int = 0,
    version: float = 1.0,
) -> tuple[Path, list[dict]]:
    """Write an lm-eval multiple-choice cloze over ``text`` (held-out text!) to ``folder``: ``NAME.jsonl`` and
    ``NAME.yaml``; returns (the YAML path, the documents).

    Each item is a line cut before an inner lower-case word: the context is the words before it, the choices
    are that word and ``n_choices - 1`` other words drawn from the word *occurrences* of ``text`` (so by
    unigram frequency, as the answer itself is): a model that ignores the context is at chance, 1/n_choices.
    The YAML reads the JSONL with the ``json`` builder of ``datasets``, so the task never needs the network.
    """
    import json as _json
    import random as _random

    rng = _random.Random(seed)
    lines = [ln.split() for ln in text.splitlines()]
    pool = [w for ws in lines for w in ws if w.isalpha() and w.islower()]
    if len(set(pool)) < n_choices:
        raise EvalError(f"write_cloze_task: the text has fewer than {n_choices} distinct lower-case words")
    docs = []
    for words in lines:
        inner = [k for k in range(2, len(words) - 1) if words[k].isalpha() and words[k].islower()]
        if len(words) < 5 or not inner:
            continue
        k = rng.choice(inner)
        answer = words[k]
        choices: list[str] = []
        while len(choices) < n_choices - 1:
            w = rng.choice(pool)
            if w != answer and w not in choices:
                choices.append(w)
        gold = rng.randrange(n_choices)
        choices.insert(gold, answer)
        docs.append({"context": " ".join(words[:k]), "choices": choices, "label": gold})
        if len(docs) == n_docs:
            break
    if not docs:
        raise EvalError("write_cloze_task: no line of the text has 5+ words with an inner lower-case word")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    tmp = data.with_name(f".{data.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(_json.dumps(d) + "\n" for d in docs))
    os.replace(tmp, data)
    yaml = folder / f"{name}.yaml"
    desc = _json.dumps(f"{n_choices}-way next-word cloze, {len(docs)} items, seed {seed}")
    yaml.write_text(
        _CLOZE_YAML.format(name=name, data=_json.dumps(str(data.resolve())), version=version, description=desc)
    )
    return yaml, docs


# ------------------------------------------------------------------------------------------ results
def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def task_entries(res: dict, *, limit, num_fewshot, fp: str) -> dict[str, dict]:
    """One ``eval.json`` task entry per task (and group) in an ``lm_eval.simple_evaluate`` result."""
    out = {}
    n_samples = res.get("n-samples", {})
    results = res.get("results", {})
    scored = {t for t, vals in results.items() if any("," in k and _num(v) is not None for k, v in vals.items())}
    # members of a group that has its own aggregate score (not of a tag, which has none)
    parent = {
        sub: group for group, subs in (res.get("group_subtasks") or {}).items() if group in scored for sub in subs
    }
    for task, vals in results.items():
        metrics, stderr = {}, {}
        for key, v in vals.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                name = metric[: -len("_stderr")] + ("" if filt == "none" else f",{filt}")
                stderr[name] = _num(v)
            elif _num(v) is not None:
                metrics[metric + ("" if filt == "none" else f",{filt}")] = _num(v)
        if not metrics:
            continue
        ns = n_samples.get(task, {})
        out[task] = {
            "version": res.get("versions", {}).get(task),
            "metrics": metrics,
            "stderr": {k: stderr.get(k) for k in metrics},
            "higher_is_better": res.get("higher_is_better", {}).get(task, {}),
            "n_samples": ns.get("effective"),
            "n_samples_total": ns.get("original"),
            "num_fewshot": res.get("n-shot", {}).get(task, num_fewshot),
            "limit": limit,
            "fingerprint": fp,
        }
        if task in parent:  # a member of a group (e.g. one MMLU subject): kept here, not given report columns
            out[task]["subtask_of"] = parent[task]
    return out


def read_eval(folder: Path) -> dict:
    path = Path(folder) / EVAL_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e}); delete it and evaluate again") from e
    if not isinstance(data, dict) or not isinstance(data.get("tasks", {}), dict):
        raise EvalError(f"{path}: not a layerwise eval.json (no 'tasks' mapping)")
    return data


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _limit(limit):
    if limit is None:
        return None
    limit = float(limit)
    if limit <= 0:
        raise EvalError(f"--limit must be > 0 (items per task, or a fraction < 1), got {limit:g}")
    return int(limit) if limit >= 1 else limit


def evaluate(
    path: str | Path,
    tasks: str | Iterable[str],
    *,
    limit=None,
    batch_size: int | str = 8,
    device: str | None = None,
    include_path: Iterable[str | Path] = (),
    num_fewshot: int | None = None,
    out: str | Path | None = None,
    dtype: str = "float32",
    log_samples: bool = False,
    bootstrap_iters: int = 100000,
    quiet: bool = False,
) -> dict:
    """Evaluate a RUN_DIR or HF_DIR on lm-eval ``tasks``; merge the results into ``eval.json`` and return it.

    ``limit`` caps the items per task (a fraction if < 1; lm-eval says: for testing only).  ``log_samples``
    also writes lm-eval's per-item records (arguments, log-likelihoods, per-item metrics) to
    ``eval_samples/<task>.jsonl``.
    """
    lm_eval = require_lm_eval()
    names, inc = parse_tasks(tasks, include_path)
    limit = _limit(limit)
    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if isinstance(batch_size, str) and batch_size != "auto" and not batch_size.startswith("auto:"):
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise EvalError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}") from None
    if isinstance(batch_size, int) and batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = task_manager(names, inc)
    hf_dir, dest = resolve_model(path, quiet=quiet)
    dest = Path(out) if out else dest
    dest.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(Path(path))
    if not quiet:
        print(f"[eval] {path}: {', '.join(names)} on {device}" + (f" (limit {limit})" if limit else ""))
    t0 = time.perf_counter()
    try:
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(hf_dir.resolve()), "dtype": dtype},
            tasks=names,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=tm,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
        )
    except OSError as e:  # ConnectionError included: a task's dataset is neither cached nor reachable
        offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
        raise EvalError(
            f"lm-eval could not load {', '.join(names)}: {type(e).__name__}: {e}. Standard tasks "
            "download their datasets from the Hugging Face Hub the first time"
            + (f" ({' and '.join(offline)} set here)" if offline else "")
            + "; see docs/eval.md"
        ) from e
    wall = time.perf_counter() - t0
    if res is None:  # a non-zero rank under accelerate launch
        return {}
    entries = task_entries(res, limit=limit, num_fewshot=num_fewshot, fp=fp)
    for entry in entries.values():
        entry["wall_s"] = wall
        entry["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data = read_eval(dest)
    data.update(
        {
            "format": 1,
            "model": str(hf_dir),
            "source": str(path),
            "fingerprint": fp,
            "lm_eval_version": res.get("lm_eval_version"),
            "transformers_version": res.get("transformers_version"),
            "device": device,
            "dtype": dtype,
        }
    )
    data.setdefault("tasks", {}).update(entries)
    _write_json_atomic(dest / EVAL_FILE, data)
    if log_samples:
        sdir = dest / "eval_samples"
        sdir.mkdir(exist_ok=True)
        for task, recs in res.get("samples", {}).items():
            tmp = sdir / f".{task}.jsonl.tmp-{os.getpid()}"
            with tmp.open("w") as f:
                for r in recs:
                    f.write(json.dumps(r, default=str) + "\n")
            os.replace(tmp, sdir / f"{task}.jsonl")
    if not quiet:
        print(format_entries(entries))
        print(f"wrote {dest / EVAL_FILE}  ({wall:.1f}s)")
    return data


def format_entries(entries: dict[str, dict]) -> str:
    lines = ["| task | version | metric | value | lm-eval s.e. | items |", "|---|---|---|---|---|---|"]
    for task, e in entries.items():
        for m, v in e["metrics"].items():
            se = e["stderr"].get(m)
            lines.append(
                f"| {task} | {e['version']} | {m} | {v:.4f} | {'n/a' if se is None else f'{se:.4f}'} | "
                f"{e['n_samples']} |"
            )
    return "\n".join(lines)


def _up_to_date(data: dict, task: str, fp: str, limit, num_fewshot) -> bool:
    e = data.get("tasks", {}).get(task)
    return (
        bool(e)
        and e.get("fingerprint") == fp
        and e.get("limit") == limit
        and (num_fewshot is None or e.get("num_fewshot") == num_fewshot)
    )


def evaluate_runs(
    run_dirs: Iterable[str | Path], tasks: str | Iterable[str], *, quiet: bool = False, **options
) -> dict[str, dict]:
    """``evaluate`` every finished run in ``run_dirs`` on the tasks it has no up-to-date entry for."""
    names, inc = parse_tasks(tasks, options.pop("include_path", ()) or ())
    limit = _limit(options.get("limit"))
    out = {}
    for run in map(Path, run_dirs):
        if not (run / "summary.json").is_file():
            if not quiet:
                print(f"[eval] {run}: not finished (no summary.json), not evaluated")
            continue
        data = read_eval(run)
        fp = fingerprint(run)
        todo = [n for n in names if not _up_to_date(data, n, fp, limit, options.get("num_fewshot"))]
        if not todo:
            if not quiet:
                print(f"[skip] eval {run}: {', '.join(names)} already evaluated")
            out[str(run)] = data
            continue
        out[str(run)] = evaluate(run, todo, include_path=inc, quiet=quiet, **options)
    return out


# ------------------------------------------------------------------------------------------ report columns
def _mean_se(xs: list[float]) -> tuple[float, float]:
    from layerwise.lab.experiments import mean_se

    return mean_se(xs)


def eval_rows(found: dict[str, dict[int, Path]], order: list[str], *, warn=print) -> tuple[list[str], dict]:
    """Columns ``task/metric`` and, per method, {column: stats} from the runs' ``eval.json`` files.

    Stats per column: ``mean``/``se`` over seeds, ``n`` seeds, ``paired``/``paired_se`` (per-seed difference vs
    ``order[0]`` on the seeds both have) and ``item_se`` (lm-eval's s.e. over items, averaged over seeds).  An
    entry computed on an earlier state of its run is left out with a warning; members of a group (``subtask_of``)
    get no columns of their own (the group's aggregate has them).
    """
    vals: dict[str, dict[str, dict[int, tuple[float, float | None]]]] = {}
    cols: list[str] = []
    for m in order:
        for seed, run in sorted(found.get(m, {}).items()):
            data = read_eval(run)
            if not data:
                continue
            fp = fingerprint(run)
            for task, e in sorted(data.get("tasks", {}).items()):
                if e.get("subtask_of"):
                    continue
                if e.get("fingerprint") != fp:
                    warn(
                        f"report: {run / EVAL_FILE}: {task} was evaluated on an earlier state of the run; "
                        f"left out (re-run `layerwise eval {run} --tasks {task}`)"
                    )
                    continue
                for metric, v in e.get("metrics", {}).items():
                    col = f"{task}/{metric}"
                    if col not in cols:
                        cols.append(col)
                    vals.setdefault(m, {}).setdefault(col, {})[seed] = (v, e.get("stderr", {}).get(metric))
    if not cols:
        return [], {}
    ref = vals.get(order[0], {})
    stats: dict[str, dict] = {}
    for m in order:
        stats[m] = {}
        for col in cols:
            by_seed = vals.get(m, {}).get(col, {})
            if not by_seed:
                continue
            mean, se = _mean_se([v for v, _ in by_seed.values()])
            r = ref.get(col, {})
            dm, dse = _mean_se([by_seed[k][0] - r[k][0] for k in by_seed if k in r])
            item = [s for _, s in by_seed.values() if s is not None]
            stats[m][col] = {
                "n": len(by_seed),
                "mean": mean,
                "se": se,
                "paired": dm,
                "paired_se": dse,
                "n_paired": sum(k in r for k in by_seed),
                "item_se": sum(item) / len(item) if item else None,
            }
    return cols, stats


def _pm(mean: float, se: float, n: int, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    v = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return f"{v} ± {se:.4f}" if n > 1 and se is not None and math.isfinite(se) else f"{v} ± n/a"


def eval_markdown(cols: list[str], stats: dict, order: list[str]) -> str:
    """The downstream table: per task metric, mean ± s.e. over seeds and the paired difference vs ``order[0]``."""
    if not cols:
        return ""
    ref = order[0]
    head = "| method | " + " | ".join(f"{c} | Δ vs {ref} (paired)" for c in cols) + " |\n"
    head += "|---|" + "---|---|" * len(cols) + "\n"
    lines = []
    for m in order:
        cells = []
        for c in cols:
            s = stats.get(m, {}).get(c)
            if not s:
                cells += ["—", "—"]
                continue
            cells.append(f"{_pm(s['mean'], s['se'], s['n'])} (n={s['n']})")
            cells.append(_pm(s["paired"], s["paired_se"], s["n_paired"], signed=True) if s["n_paired"] else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    items = []
    for c in cols:
        ses = [stats[m][c]["item_se"] for m in order if c in stats.get(m, {}) and stats[m][c]["item_se"] is not None]
        if ses:
            items.append(f"{c} ±{sum(ses) / len(ses):.4f}")
    note = (
        (
            "\nlm-eval's s.e. over items of one run (the spread a fixed item set adds to every run alike): "
            + ", ".join(items)
            + "\n"
        )
        if items
        else ""
    )
    return "\n#### downstream (lm-eval)\n\n" + head + "\n".join(lines) + "\n" + note


# ------------------------------------------------------------------------------------------ CLI
def add_eval_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The options shared by ``layerwise eval`` and ``layerwise compare --eval-tasks`` (``prefix='eval-'``)."""
    p.add_argument(
        f"--{prefix}limit",
        type=float,
        default=None,
        help="items per task (a fraction if < 1); lm-eval's own advice: for testing only",
    )
    p.add_argument(f"--{prefix}batch-size", default="8", help="batch size (an integer or 'auto'; default 8)")
    p.add_argument(f"--{prefix}device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        f"--{prefix}include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of extra task YAML files (repeatable)",
    )
    p.add_argument(f"--{prefix}num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument(f"--{prefix}dtype", default="float32", help="model dtype for lm-eval (float32, bfloat16, auto)")


def eval_options(args: argparse.Namespace, prefix: str = "") -> dict:
    g = lambda k: getattr(args, prefix.replace("-", "_") + k)  # noqa: E731
    return {
        "limit": g("limit"),
        "batch_size": g("batch_size"),
        "device": g("device"),
        "include_path": g("include_path"),
        "num_fewshot": g("num_fewshot"),
        "dtype": g("dtype"),
    }


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from layerwise.lab.cli import add_command

    p = add_command(subparsers, "eval", "downstream tasks with lm-evaluation-harness (RUN_DIR or HF folder)", __doc__)
    p.add_argument("path", help="a finished run directory or a Hugging Face model folder")
    p.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval task names or task YAML paths, e.g. arc_easy,hellaswag"
    )
    add_eval_args(p)
    p.add_argument("--out", default=None, help="folder for eval.json (default: the run / model folder)")
    p.add_argument("--log-samples", action="store_true", help="also write eval_samples/<task>.jsonl")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        evaluate(args.path, args.tasks, out=args.out, log_samples=args.log_samples, **eval_options(args))
    except EvalError as e:
        print(f"layerwise eval: error: {e}", file=sys.stderr)
        return 2
    return 0
