"""Shared fixtures: a private data cache and a small generated text corpus (tests never use the network)."""

from __future__ import annotations

import os

import pytest
import torch
from tests._helpers import make_text

torch.set_num_threads(1)
# the C++ optimizer kernel is content-addressed (source, flags, torch, CPU): one build serves every test
# session instead of one per session's private cache
os.environ.setdefault("LAYERWISE_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "layerwise", "kernels"))


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
