"""The ``layerwise`` command line (also ``python -m layerwise``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from layerwise.lab.config import PRESETS, ConfigError

_QUICK_VOCAB = PRESETS["quick"]["data.vocab_size"]


def add_command(sub, name: str, help_text: str, doc: str | None) -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` shows ``doc`` (its module docstring, RST double backquotes removed) with
    the line breaks as written."""
    return sub.add_parser(
        name,
        help=help_text,
        description=(doc or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_set_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) into ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help_text)


def add_runs_folder_args(p: argparse.ArgumentParser, command: str) -> None:
    """``--jobs``, ``--out``, ``--overwrite``: a folder of runs that compare / sweep fill and reuse."""
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes; threads are split; default 1)")
    p.add_argument(
        "--out",
        help=f"output folder (default runs/{command}-<preset>); a finished run in it is reused "
        "only if its recorded config and data equal this command's",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="re-run the runs in --out whose recorded config or "
        "data differ from this command's (default: refuse, naming the difference)",
    )


def add_config_args(
    p: argparse.ArgumentParser,
    preset_default: str | None = None,
    set_help: str = "override one config value (repeatable), e.g. --set optim.lr=1e-3",
) -> None:
    """``--preset``, ``--config`` and ``--set``: the config of a command that trains (train, compare, sweep)."""
    names = ", ".join(PRESETS)
    p.add_argument(
        "--preset",
        default=preset_default,
        help=f"named preset: {names} (default: {preset_default or 'none: the defaults in config.py'})",
    )
    p.add_argument("--config", help="a TOML config file (applied after the preset)")
    add_set_arg(p, set_help)


#: the options of `layerwise data prepare`: the keys of the config's [data] section of the same names
_DATA_OPTIONS = (
    "corpus",
    "valid",
    "vocab_size",
    "tokenizer",
    "text_field",
    "eos_token",
    "max_tokens",
    "max_valid_tokens",
    "num_proc",
)


def cmd_data(args) -> int:
    from layerwise.lab.config import DataSection
    from layerwise.lab.data import prepare_config

    data = DataSection(**{k: getattr(args, k) for k in _DATA_OPTIONS})
    prepare_config(data, verbose=True, force=args.force)
    return 0


def cmd_train(args) -> int:
    from layerwise.lab.config import apply_overrides, resolve
    from layerwise.lab.train import run_config, train

    if args.resume:
        if args.preset or args.config or args.out:
            raise ConfigError(
                "--resume continues a run with its own config.toml in its own folder; use --set to "
                "change values (with --allow-changes)"
            )
        if args.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")
        run_dir = Path(args.resume)
        cfg = apply_overrides(run_config(run_dir), args.overrides)
    else:
        if args.allow_changes:
            raise ConfigError("--allow-changes only applies with --resume")
        cfg = resolve(args.preset, args.config, args.overrides)
        run_dir = Path(args.out) if args.out else Path("runs") / (args.preset or "train")
    args.resume_hint = f"layerwise train --resume {run_dir}"
    summary = train(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite, allow_changes=args.allow_changes)
    if "stopped_at" in summary:
        print(
            f"stopped after step {summary['stopped_at']} of {summary['steps']} (train.stop_at); continue with "
            f"`layerwise train --resume {run_dir}`"
        )
        return 0
    if os.environ.get("RANK", "0") != "0":  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    print(
        f"final val loss {summary['final_val_loss']:.4f}  ppl {summary['final_val_ppl']:.2f}  "
        f"steps {summary['steps']}  tokens {summary['tokens']:,}  {summary['wall_s']:.1f}s  -> {run_dir}"
    )
    return 0


def cmd_compare(args) -> int:
    from layerwise.lab.experiments import compare

    specs = [s for s in _split_methods(args.methods) if s]
    out = args.out or f"runs/compare-{args.preset or 'custom'}"
    ev = {}
    if args.eval_tasks:
        from layerwise.lab.downstream import eval_options

        ev = {"eval_tasks": args.eval_tasks, "eval_options": eval_options(args, "eval-")}
    try:
        compare(
            args.preset,
            specs,
            args.seeds,
            out,
            config_file=args.config,
            overrides=args.overrides,
            seed_offset=args.seed_offset,
            jobs=args.jobs,
            overwrite=args.overwrite,
            **ev,
        )
    except RuntimeError as e:
        from layerwise.lab.downstream import EvalError

        if isinstance(e, EvalError):
            print(f"layerwise compare: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


def _split_methods(text: str) -> list[str]:
    """Split on commas outside brackets: ``adamw[optim.lr=1e-3,optim.weight_decay=0],alphadecay``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def cmd_report(args) -> int:
    from layerwise.lab.report import report

    report(args.runs, args.out or args.runs[0], ref=args.ref)
    return 0


def cmd_demo(args) -> int:
    from layerwise.lab.experiments import compare
    from layerwise.lab.methods import DEMO_METHODS

    print(f"layerwise demo: preset 'quick', methods {', '.join(DEMO_METHODS)}, one seed each")
    res = compare(
        "quick",
        list(DEMO_METHODS),
        1,
        args.out,
        overrides=args.overrides,
        jobs=args.jobs,
        overwrite=args.overwrite,
        notes=[DEMO_SCALING_NOTE],
    )
    from layerwise.lab.config import preset
    from layerwise.lab.data import prepare, unigram_entropy

    q = preset("quick")
    td = prepare(q.data.corpus, q.data.vocab_size, num_proc=1)
    print(
        f"unigram entropy of the validation split (context-free baseline): "
        f"{unigram_entropy(td.train, td.val, td.vocab_size):.4f} nats/token"
    )
    best = min(res["rows"], key=lambda r: r["val_loss"])
    print(
        f"lowest final validation loss: {best['method']} {best['val_loss']:.4f} "
        "(one seed per method: for mean ± s.e. and paired differences run `layerwise compare --seeds 3`)"
    )
    print(DEMO_SCALING_NOTE)
    return 0


#: What the demo's ``scaling`` row is, printed under its table.
DEMO_SCALING_NOTE = (
    "note: `scaling` is muP with matrix weight decay x sqrt(width) (Fan et al.) and its base width set to a "
    "quarter of the model's width, run with the preset's lr and weight decay, which were never tuned for that "
    "quarter-width proxy. It shows the mechanics, not whether the rule transfers tuned hyper-parameters: that "
    "needs a tuned proxy (`layerwise sweep`; see BENCHMARKS.md, 'Width transfer')."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwise",
        description="Module-wise optimisation control for LLM "
        "pre-training: AlphaDecay, AlphaAdam, learnable multipliers, width scaling.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="prepare token shards")
    dsub = p.add_subparsers(dest="data_command", required=True)
    pp = dsub.add_parser("prepare", help="download/read the corpus, train the BPE, write verified uint16 shards")
    pp.add_argument(
        "--corpus",
        default="shakespeare",
        help="'shakespeare', a text file or folder, a .jsonl/.json/"
        ".parquet/.arrow/.csv file or folder, or hf:NAME[:CONFIG]",
    )
    pp.add_argument(
        "--valid", default="", help="validation file/folder or hf: split name (default: the corpus's own split)"
    )
    pp.add_argument(
        "--vocab-size",
        type=int,
        default=_QUICK_VOCAB,
        help=f"size of the trained BPE (--tokenizer train; default {_QUICK_VOCAB}: the `quick` preset's, "
        "so `layerwise demo` reuses this cache entry)",
    )
    pp.add_argument("--tokenizer", default="train", help="'train' or a tokenizer.json / HF tokenizer folder")
    pp.add_argument("--text-field", default="text", help="text column of record sources")
    pp.add_argument("--eos-token", default="", help="end-of-document token (default: from the tokenizer)")
    pp.add_argument("--max-tokens", type=int, default=0, help="tokenize at most this many training tokens")
    pp.add_argument(
        "--max-valid-tokens", type=int, default=0, help="tokenize at most this many validation tokens (0 = all)"
    )
    pp.add_argument("--num-proc", type=int, default=0, help="worker processes (0 = every core)")
    pp.add_argument("--force", action="store_true", help="rebuild even if a valid cache entry exists")
    pp.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train one run")
    add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/<preset>); refused if it already holds a run")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (refused if its corpus or tokenizer changed)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start afresh")
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: accept --set changes of result-relevant values (e.g. a longer "
        "train.max_steps, a lower optim.lr); the learning-rate jump is printed and the change is "
        "recorded in RUN_DIR/identity.json",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "compare",
        help="methods × seeds with paired differences",
        epilog=_methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, "quick")
    p.add_argument(
        "--methods",
        default="adamw",
        help="comma-separated method specs (registered names below, "
        "combined with +, with inline overrides in [...]), e.g. adamw,alphadecay,muon+multipliers,"
        "adamw[optim.weight_decay=0.05] (default: adamw)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="seeds per method; seed k gives every method the same "
        "initial weights and batches (default 3; 1 gives no standard errors)",
    )
    p.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="first seed (default 0): --seed-offset 3 --seeds 2 runs seeds 3 and 4",
    )
    add_runs_folder_args(p, "compare")
    p.add_argument(
        "--eval-tasks",
        default=None,
        help="also evaluate every finished run on these lm-eval tasks "
        "(names or task YAML paths, comma-separated; see `layerwise eval`)",
    )
    from layerwise.lab.downstream import add_eval_args

    add_eval_args(p, "eval-")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="tables and plots from finished runs")
    p.add_argument("runs", nargs="+", help="run directories or folders of runs")
    p.add_argument("--out", help="where to write results.md and plots/ (default: the first RUN)")
    p.add_argument(
        "--ref",
        help="method that paired differences are taken against (an error if no such method "
        "is found; default: the order of an earlier compare in that folder, else the first name)",
    )
    p.set_defaults(func=cmd_report)

    from layerwise.lab.methods import DEMO_METHODS, METHODS

    p = sub.add_parser(
        "demo",
        help=f"prepare Shakespeare and compare {len(DEMO_METHODS)} of the {len(METHODS)} "
        "registered methods on the `quick` preset (one seed)",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2: one per core)")
    add_set_arg(p, "override a value of the `quick` preset for every run (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="re-run runs in --out made by another config")
    p.set_defaults(func=cmd_demo)

    for module in (
        "layerwise.lab.analyze",
        "layerwise.lab.sweep",
        "layerwise.lab.export",
        "layerwise.lab.anatomy_cmd",
        "layerwise.lab.downstream",
    ):
        importlib.import_module(module).register(sub)  # an import error here is a bug: never hide a command
    return parser


def _methods_epilog() -> str:
    from layerwise.lab.methods import METHODS

    lines = ["registered methods (overrides on top of the preset):"]
    for name, over in METHODS.items():
        lines.append(f"  {name:<12} " + (", ".join(f"{k}={v}" for k, v in over.items()) or "(the preset as is)"))
    return "\n".join(lines)


def _interrupted(args, argv: list[str] | None, e: KeyboardInterrupt) -> int:
    """Ctrl-C: one message and the command that continues, no traceback."""
    import shlex

    where = f" ({e})" if str(e) else ""
    hint = getattr(args, "resume_hint", None)
    if hint is None:
        hint = "layerwise " + shlex.join(sys.argv[1:] if argv is None else argv)
        hint += "   (the same command: finished runs are reused, interrupted ones resume from their checkpoint)"
    print(f"\nlayerwise {args.command}: interrupted{where}. Continue with:\n  {hint}", file=sys.stderr)
    return 130


#: top-level modules of the ``lab`` extra (``pip install 'layerwise[lab]'``): the harness needs them, the
#: library does not
LAB_EXTRA_MODULES = ("tokenizers", "tqdm", "matplotlib", "tensorboard")


def missing_lab_extra(exc: BaseException) -> str | None:
    """The message for an ImportError of a ``lab``-extra package, else ``None``."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if isinstance(exc, ImportError) and name in LAB_EXTRA_MODULES:
        return f"the package {name!r} is missing: the harness needs the 'lab' extra (pip install 'layerwise[lab]')"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        return _interrupted(args, argv, e)
    except ImportError as e:
        msg = missing_lab_extra(e)
        if msg is None:
            raise
        print(f"layerwise {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"layerwise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from layerwise.lab.checkpoint import CheckpointError
        from layerwise.lab.data import DataError
        from layerwise.lab.distwatch import DistributedTimeoutError
        from layerwise.lab.runlock import RunLockedError
        from layerwise.lab.safeload import UnsafeCheckpointError
        from layerwise.lab.train import NonFiniteLossError

        if isinstance(
            e,
            (
                DataError,
                NonFiniteLossError,
                CheckpointError,
                RunLockedError,
                DistributedTimeoutError,
                UnsafeCheckpointError,
            ),
        ):
            print(f"layerwise {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
