"""The ``layerwise`` command line (also ``python -m layerwise``)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from layerwise.lab.config import ConfigError


def _add_config_args(p: argparse.ArgumentParser, preset_default: str | None = None) -> None:
    p.add_argument("--preset", default=preset_default, help="named preset (quick, smoke, llama-60m, llama-135m)")
    p.add_argument("--config", help="a TOML config file (applied after the preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set optim.lr=1e-3")


def cmd_data(args) -> int:
    from layerwise.lab.data import prepare

    prepare(args.corpus, args.vocab_size, args.valid, force=args.force, verbose=True)
    return 0


def cmd_train(args) -> int:
    from layerwise.lab.config import apply_overrides, resolve
    from layerwise.lab.train import run_config, train

    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume continues a run with its own config.toml; use --set to change values")
        run_dir = Path(args.resume)
        cfg = apply_overrides(run_config(run_dir), args.overrides)
    else:
        cfg = resolve(args.preset, args.config, args.overrides)
        run_dir = Path(args.out) if args.out else Path("runs") / (args.preset or "train")
    summary = train(cfg, run_dir, resume=bool(args.resume))
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} of {summary['steps']} (train.stop_at); continue with "
              f"`layerwise train --resume {run_dir}`")
        return 0
    if os.environ.get("RANK", "0") != "0":  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    print(f"final val loss {summary['final_val_loss']:.4f}  ppl {summary['final_val_ppl']:.2f}  "
          f"steps {summary['steps']}  tokens {summary['tokens']:,}  {summary['wall_s']:.1f}s  -> {run_dir}")
    return 0


def cmd_compare(args) -> int:
    from layerwise.lab.experiments import compare

    specs = [s for s in _split_methods(args.methods) if s]
    out = args.out or f"runs/compare-{args.preset or 'custom'}"
    compare(args.preset, specs, args.seeds, out, config_file=args.config, overrides=args.overrides,
            seed_offset=args.seed_offset, jobs=args.jobs)
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

    report(args.runs, args.out or args.runs[0], method_order=[args.ref] if args.ref else None)
    return 0


def cmd_demo(args) -> int:
    from layerwise.lab.experiments import compare
    from layerwise.lab.methods import DEMO_METHODS

    print(f"layerwise demo: preset 'quick', methods {', '.join(DEMO_METHODS)}, one seed each")
    res = compare("quick", list(DEMO_METHODS), 1, args.out, overrides=args.overrides, jobs=args.jobs)
    from layerwise.lab.config import preset
    from layerwise.lab.data import prepare, unigram_entropy

    q = preset("quick")
    td = prepare(q.data.corpus, q.data.vocab_size)
    print(f"unigram entropy of the validation split (context-free baseline): "
          f"{unigram_entropy(td.train, td.val, td.vocab_size):.4f} nats/token")
    best = min(res["rows"], key=lambda r: r["val_loss"])
    print(f"lowest final validation loss: {best['method']} {best['val_loss']:.4f} "
          "(one seed per method: for mean ± s.e. and paired differences run `layerwise compare --seeds 3`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerwise", description="Module-wise optimisation control for LLM "
                                     "pre-training: AlphaDecay, AlphaAdam, learnable multipliers, width scaling.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="prepare token shards")
    dsub = p.add_subparsers(dest="data_command", required=True)
    pp = dsub.add_parser("prepare", help="download/read the corpus, train the BPE, write verified uint16 shards")
    pp.add_argument("--corpus", default="shakespeare", help="'shakespeare' or a text file, folder, or .jsonl")
    pp.add_argument("--valid", default="", help="validation file/folder (default: the corpus's own split)")
    pp.add_argument("--vocab-size", type=int, default=8192)
    pp.add_argument("--force", action="store_true", help="rebuild even if a valid cache entry exists")
    pp.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train one run")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="methods × seeds with paired differences")
    _add_config_args(p, "quick")
    p.add_argument("--methods", default="adamw", help="comma-separated method specs, e.g. adamw,alphadecay,"
                   "muon+multipliers,adamw[optim.weight_decay=0.05]")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes; threads are split)")
    p.add_argument("--out", help="output folder (default runs/compare-<preset>)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="tables and plots from finished runs")
    p.add_argument("runs", nargs="+", help="run directories or folders of runs")
    p.add_argument("--out", help="where to write results.md and plots/ (default: the first RUN)")
    p.add_argument("--ref", help="method that paired differences are taken against (default: the order of an "
                   "earlier compare in that folder, else the first name)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="prepare Shakespeare and compare every registered method (one seed)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2: one per core)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_demo)

    for module in ("layerwise.lab.analyze", "layerwise.lab.sweep", "layerwise.lab.export", "layerwise.lab.anatomy_cmd"):
        importlib.import_module(module).register(sub)  # an import error here is a bug: never hide a command
    return parser


#: top-level modules of the ``lab`` extra (``pip install 'layerwise[lab]'``): the harness needs them, the
#: library does not
LAB_EXTRA_MODULES = ("tokenizers", "tqdm", "matplotlib", "tensorboard")


def missing_lab_extra(exc: BaseException) -> str | None:
    """The message for an ImportError of a ``lab``-extra package, else ``None``."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if isinstance(exc, ImportError) and name in LAB_EXTRA_MODULES:
        return (f"the package {name!r} is missing: the harness needs the 'lab' extra "
                "(pip install 'layerwise[lab]')")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
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

        if isinstance(e, (DataError, NonFiniteLossError, CheckpointError, RunLockedError, DistributedTimeoutError,
                          UnsafeCheckpointError)):
            print(f"layerwise {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
