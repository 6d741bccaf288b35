"""Tokenizers and token shards: pretrained tokenizers, parallel encoding, sharded uint16/uint32 token files.

* :func:`load_pretrained` reads ``data.tokenizer = PATH`` — a ``tokenizer.json`` or a Hugging Face tokenizer
  folder (its ``tokenizer.json``; a folder with only a slow tokenizer, e.g. ``spiece.model``, is converted by
  ``transformers.AutoTokenizer`` when that is installed).  The end-of-document token comes from the
  tokenizer itself: ``data.eos_token`` if set, else the folder's ``tokenizer_config.json`` ``eos_token``, else
  the first special token named like an EOS (``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>``, ...).
  Documents are encoded without the tokenizer's own post-processing (no BOS/EOS added per call) and the EOS
  id is appended after each document.
* :func:`encode_to_shards` encodes a :class:`~layerwise.lab.sources.Source` stream in ``num_proc`` worker
  processes (batches of documents, at most ``2 × num_proc`` in flight, results written in order), into shard
  files of at most ``shard_tokens`` tokens each, with a progress bar in tokens and tokens/s.  Memory is
  bounded by the in-flight batches, whatever the corpus size.  Each shard's SHA-256 is computed while it is
  written.
* :class:`ShardedTokens` reads the shards of one split as one memory-mapped token array (fancy indexing
  across shard boundaries), which is what the batch sampler and the evaluation take.

Token ids are ``uint16`` when every id fits (vocabulary ≤ 65,536), else ``uint32``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|end|>", "[EOS]", "<|im_end|>")
BATCH_CHARS = 1 << 20  # characters per worker batch
SHARD_TOKENS = 1 << 27  # tokens per shard file (512 MiB as uint32)


from layerwise.lab.sources import DataError  # noqa: E402


class TokenizerError(DataError):
    """A tokenizer cannot be used; the message names the file or field."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ------------------------------------------------------------------------------------------ tokenizers
def _special_tokens(tok) -> list[str]:
    try:
        added = tok.get_added_tokens_decoder()
    except AttributeError:  # pragma: no cover - very old tokenizers
        return []
    return [t.content for _, t in sorted(added.items()) if t.special]


def _config_eos(folder: Path) -> str | None:
    p = folder / "tokenizer_config.json"
    if not p.exists():
        return None
    try:
        eos = json.loads(p.read_text()).get("eos_token")
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"data.tokenizer: {p} is not readable JSON ({e})") from e
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def load_pretrained(path: str | os.PathLike, eos_token: str = ""):
    """(``tokenizers.Tokenizer``, eos token string, info dict) of a ``tokenizer.json`` or an HF folder."""
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    folder = p if p.is_dir() else p.parent
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            file = p / "tokenizer.json"
            try:
                tok = Tokenizer.from_file(str(file))
            except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
                raise TokenizerError(f"data.tokenizer: {file} is not a tokenizers JSON file ({e})") from e
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise TokenizerError(
                    f"data.tokenizer: {p} has no tokenizer.json; converting its slow tokenizer "
                    "needs the 'transformers' package (pip install 'layerwise[hf]')"
                ) from e
            try:
                hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            except (OSError, ValueError) as e:
                raise TokenizerError(f"data.tokenizer: transformers cannot load a tokenizer from {p} ({e})") from e
            if not getattr(hf, "is_fast", False):
                raise TokenizerError(f"data.tokenizer: {p} has no fast (tokenizers) version")
            tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
            eos_token = eos_token or (hf.eos_token or "")
    elif p.is_file():
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"data.tokenizer: {p} is not a tokenizers JSON file ({e})") from e
    elif _looks_like_hub_id(str(path)):
        return _load_hub(str(path), eos_token)
    else:
        raise TokenizerError(
            f"data.tokenizer: {p} does not exist (use 'train', a tokenizer.json or a tokenizer folder)"
        )
    specials = _special_tokens(tok)
    eos = eos_token or _config_eos(folder) or next((s for s in EOS_NAMES if s in specials), None)
    if eos is None:
        raise TokenizerError(
            f"data.tokenizer: cannot tell the end-of-document token of {p} (special tokens: "
            f"{specials[:12]}); set data.eos_token"
        )
    if tok.token_to_id(eos) is None:
        raise TokenizerError(f"data.tokenizer: the EOS token {eos!r} is not in the vocabulary of {p}")
    bos = next((s for s in ("<s>", "<|begin_of_text|>", "<bos>") if s in specials), None)
    info = {"tokenizer_source": str(p.resolve() if p.is_dir() else p.resolve()), "eos_token": eos, "bos_token": bos}
    return tok, eos, info


def _looks_like_hub_id(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name)) and not name.endswith(".json")


def _load_hub(name: str, eos_token: str):
    """A tokenizer by Hugging Face hub id (``t5-base``, ``meta-llama/Llama-3.2-1B``): needs transformers and a
    network (or the transformers cache)."""
    from tokenizers import Tokenizer

    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise TokenizerError(
            f"data.tokenizer: {name!r} is not a local path; loading it from the Hugging Face hub "
            "needs the 'transformers' package (pip install 'layerwise[hf]')"
        ) from e
    try:
        hf = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise TokenizerError(
            f"data.tokenizer: {name!r} is neither a local path nor a loadable hub tokenizer ({type(e).__name__}: {e})"
        ) from e
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    eos = eos_token or hf.eos_token
    if not eos or tok.token_to_id(eos) is None:
        raise TokenizerError(f"data.tokenizer: cannot tell the end-of-document token of {name!r}; set data.eos_token")
    return tok, eos, {"tokenizer_source": name, "eos_token": eos, "bos_token": hf.bos_token}


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(tok_json: str, eos_id: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes, not inside each
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tok_json), eos=eos_id, dtype=np.dtype(dtype))


def _encode(texts: list[str], ends: list[bool]) -> np.ndarray:
    """Token ids of a batch of pieces; EOS after each piece that ends a document."""
    tok, eos, dtype = _WORKER["tok"], _WORKER["eos"], _WORKER["dtype"]
    out: list[int] = []
    for enc, end in zip(tok.encode_batch(texts, add_special_tokens=False), ends):
        out.extend(enc.ids)
        if end:
            out.append(eos)
    return np.asarray(out, dtype=dtype)


def _groups(items: Iterator[tuple[str, str, bool]]) -> Iterator[list[tuple[str, list[str], list[bool]]]]:
    """Group pieces into per-split batches of about BATCH_CHARS characters in all; the batches of every split
    are cut at the same point of the stream, so a stream stopped after a batch has given each split all its
    documents up to there."""
    cur: dict[str, tuple[list[str], list[bool]]] = {}
    size = 0
    for split, text, end in items:
        texts, ends = cur.setdefault(split, ([], []))
        texts.append(text)
        ends.append(end)
        size += len(text)
        if size >= BATCH_CHARS:
            yield [(s, t, e) for s, (t, e) in cur.items()]
            cur, size = {}, 0
    if cur:
        yield [(s, t, e) for s, (t, e) in cur.items() if t]


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.total = 0
        self._f: BinaryIO | None = None

    def _open(self) -> BinaryIO:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = f = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._h = hashlib.sha256()
        return f

    def _close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            rec = self.shards[-1]
            rec["bytes"] = rec["tokens"] * self.dtype.itemsize
            rec["sha256"] = self._h.hexdigest()

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            f = self._f if self._f is not None else self._open()
            rec = self.shards[-1]
            take = min(ids.size, self.shard_tokens - rec["tokens"])
            buf = ids[:take].tobytes()
            f.write(buf)
            self._h.update(buf)
            rec["tokens"] += take
            self.total += take
            ids = ids[take:]
            if rec["tokens"] >= self.shard_tokens:
                self._close()

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def encode_to_shards(
    parts,
    tok,
    eos_id: int,
    out_dir: Path,
    *,
    dtype: np.dtype,
    num_proc: int = 1,
    max_tokens: int = 0,
    max_valid_tokens: int = 0,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = False,
) -> dict:
    """Encode the streams ``parts`` (a :meth:`Source.parts() <layerwise.lab.sources.Source.parts>` list) into
    ``out_dir/{train,valid}-NNNNN.bin``; returns ``{"train": [shard records], "valid": [...], "seconds",
    "tokens_per_s", "num_proc"}``.  ``max_tokens`` / ``max_valid_tokens`` (> 0) stop each split at that many
    tokens; a stream is read no further once the capped splits it yields are full."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _ShardWriter(out_dir, s, dtype, shard_tokens) for s in ("train", "valid")}
    caps = {"train": max_tokens, "valid": max_valid_tokens}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing", mininterval=1.0)
    t0 = time.perf_counter()
    tok_json = tok.to_str()

    def full(split: str) -> bool:
        return bool(caps[split]) and writers[split].total >= caps[split]

    def done(splits: tuple[str, ...]) -> bool:
        """Whether a stream yielding ``splits`` can stop (an uncapped train split is read to the end; an
        uncapped validation split beside a training one just follows it)."""
        if "train" in splits and not caps["train"]:
            return False
        need = [s for s in splits if caps[s]]
        return bool(need) and all(full(s) for s in need)

    def consume(split: str, ids: np.ndarray) -> None:
        if caps[split]:
            ids = ids[: max(0, caps[split] - writers[split].total)]
        writers[split].write(ids)
        if bar is not None:
            bar.update(int(ids.size))
            el = time.perf_counter() - t0
            bar.set_postfix(
                train=writers["train"].total,
                valid=writers["valid"].total,
                tok_s=f"{(writers['train'].total + writers['valid'].total) / max(el, 1e-9):.3g}",
            )

    def each_wanted(
        handle: Callable[[str, list[str], list[bool]], object],
        after_group: Callable[[], None] = lambda: None,
        after_part: Callable[[], None] = lambda: None,
    ) -> None:
        """``handle(split, texts, ends)`` for every group of documents a split still needs, in order."""
        for splits, stream in parts:
            for group in _groups(stream):
                if done(splits):
                    break
                for split, texts, ends in group:
                    if not full(split):
                        handle(split, texts, ends)
                after_group()
            after_part()

    try:
        if num_proc <= 1:
            _init_worker(tok_json, eos_id, dtype.str)
            each_wanted(lambda split, texts, ends: consume(split, _encode(texts, ends)))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # fork where there is one: workers start at once and need no importable __main__; they use only
            # numpy + tokenizers (which turns its own thread pool off after a fork), never torch
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(
                num_proc, mp_context=ctx, initializer=_init_worker, initargs=(tok_json, eos_id, dtype.str)
            ) as pool:
                pending: deque = deque()

                def drain(limit: int) -> None:
                    while len(pending) > limit or (pending and pending[0][1].done()):
                        s, fut = pending.popleft()
                        consume(s, fut.result())

                each_wanted(
                    lambda split, texts, ends: pending.append((split, pool.submit(_encode, texts, ends))),
                    after_group=lambda: drain(2 * num_proc),
                    after_part=lambda: drain(0),
                )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    total = writers["train"].total + writers["valid"].total
    return {
        "train": writers["train"].finish(),
        "valid": writers["valid"].finish(),
        "seconds": seconds,
        "tokens_per_s": total / seconds if seconds > 0 else None,
        "num_proc": max(1, num_proc),
    }


# ------------------------------------------------------------------------------------------- reading
class ShardedTokens:
    """The token shards of one split as one read-only array: ``size``, ``dtype``, ``len``, integer and
    fancy (ndarray) indexing across shard boundaries, slicing, ``np.asarray``."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.parts = [np.memmap(p, dtype=dtype, mode="r") for p in paths if p.stat().st_size]
        self.dtype = np.dtype(dtype)
        sizes = np.array([p.size for p in self.parts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.size = int(self.starts[-1])
        self.shape = (self.size,)
        self.ndim = 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            lo, hi, step = idx.indices(self.size)
            return self[np.arange(lo, hi, step)]
        arr = np.asarray(idx)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"ShardedTokens indices must be integers, got {arr.dtype}")
        flat = arr.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + self.size, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise IndexError(f"token index out of range for {self.size} tokens")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.parts[k][flat[sel] - self.starts[k]]
        return out.reshape(arr.shape) if arr.ndim else out[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self.parts]) if self.parts else np.empty(0, self.dtype)
        return out.astype(dtype) if dtype is not None else out

    def max(self):
        return max(int(p.max()) for p in self.parts)

    def astype(self, dtype):
        return np.asarray(self).astype(dtype)


def open_split(dir: Path, shards: list[dict], dtype: np.dtype):
    """A single shard as a plain memmap, several as :class:`ShardedTokens`."""
    paths = [dir / s["file"] for s in shards if s["tokens"]]
    if len(paths) == 1:
        return np.memmap(paths[0], dtype=dtype, mode="r")
    return ShardedTokens(paths, dtype)
