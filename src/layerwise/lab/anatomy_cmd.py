"""``layerwise anatomy PATH``: what every parameter of a model is (the table of :func:`layerwise.anatomy`).

PATH is a Hugging Face model folder with ``config.json`` (the model is built from the config on the meta
device: no weights are read, nothing is downloaded), a ``.safetensors`` file or a folder of them (shapes from
the headers), or a ``.pt`` / ``.pth`` / ``.bin`` checkpoint (a state dict, or a dict holding one under
``"model"``).  Prints one Markdown row per tensor (name, shape, role, block, operator, fan_in, fan_out,
layout, tied names) and the counts; ``--json FILE`` also writes the rows as JSON.  Exit code 2 when PATH is
unreadable; 1 with ``--strict`` when some tensor is unclassified (role ``other``).
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``anatomy`` sub-command to a ``layerwise`` CLI parser; sets ``func=run``."""
    from layerwise.lab.cli import add_command

    p = add_command(
        subparsers, "anatomy", "role, block, operator and fan-in/out of every parameter of a model", __doc__
    )
    p.add_argument("path", help="Hugging Face model folder (config.json), .safetensors, or .pt/.pth/.bin file")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 if any tensor is unclassified")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from layerwise.anatomy import anatomy, from_path

    try:
        obj, what = from_path(args.path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"layerwise anatomy: error: {exc}", file=sys.stderr)
        return 2
    an = anatomy(obj)
    print(f"# {what}\n")
    print(an.to_markdown())
    odd = an.unclassified()
    if odd:
        print("\nunclassified: " + ", ".join(r.name for r in odd), file=sys.stderr)
    if args.json_path:
        tmp = f"{args.json_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(an.to_json() + "\n")
        os.replace(tmp, args.json_path)
    return 1 if (args.strict and odd) else 0
