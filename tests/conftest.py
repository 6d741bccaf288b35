"""Shared fixtures: a private data cache and a small generated text corpus (tests never use the network)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

torch.set_num_threads(1)
# the C++ optimizer kernel is content-addressed (source, flags, torch, CPU): one build serves every test
# session instead of one per session's private cache
os.environ.setdefault("LAYERWISE_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "layerwise", "kernels"))

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


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lw_cache")
    old = os.environ.get("LAYERWISE_CACHE")
    os.environ["LAYERWISE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LAYERWISE_CACHE", None)
    else:
        os.environ["LAYERWISE_CACHE"] = old


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(make_text(3000, seed=1))
    return path
