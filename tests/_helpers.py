"""Helpers the tests import (``from tests._helpers import ...``): a small generated text corpus and a JSON-lines
reader.  Kept out of ``conftest.py``: ``from tests._helpers import ...`` picks whichever ``conftest`` module pytest
registered first (``tests/spectral`` has one too), so running two test folders in one command broke it."""

from __future__ import annotations

import json
import random

_WORDS = (
    "the king queen lord lady sword crown night day love death heart blood tongue eye hand fair foul "
    "speak hear come go now never ever thou thee thy my mine our your shall will must doth hath art "
    "and but or if when where why how what who a an of in on to from with by for not no yes"
).split()


def make_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(("KING", "QUEEN", "LORD", "FOOL"))
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        lines.append(f"{speaker}. {' '.join(words).capitalize()}{rng.choice('.!?,;')}")
    return "\n".join(lines) + "\n"


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file (``metrics.jsonl``, ``spectral.jsonl``, ...), one dict per line."""
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]
